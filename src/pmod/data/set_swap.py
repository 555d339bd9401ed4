"""Swapping a data set into its folder: renames only, ``train.json`` last, so that a killed writer never leaves
new answers beside old images, and the next run finishes or undoes what it left (:func:`pmod.data.synth.generate`)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pmod.core.files import PARTIAL_SUFFIX

#: A data set's entries in its folder, in the order a new set is moved in: ``train.json`` last (and out first), so
#: a folder with a ``train.json`` holds one whole set, and one without it is known to be incomplete.
DATASET_ENTRIES: tuple[str, ...] = ("images", "test.json", "train.json")
STAGING_PREFIX = ".pmod-synth."
#: Inside the output folder while a swap is under way: the set being replaced, and (``_ALL_ASIDE``) a mark that
#: all of it is out of the way, after which entries of the folder's set are the new one's.
_OLD_NAME = f"{STAGING_PREFIX}old{PARTIAL_SUFFIX}"
_ALL_ASIDE = "all-aside"


def entry_exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif entry_exists(path):
        path.unlink()


def swap_in(staging: Path, out: Path) -> None:
    """Replace the data set in ``out`` by the one in ``staging``: the old entries moved aside (``train.json``
    first), the new ones moved in (``train.json`` last), the old ones deleted. Renames only, in one file system; a
    failure on the way puts the old set back, and so does the next run after a kill (:func:`finish_interrupted_swap`).
    """
    old = out / _OLD_NAME
    old.mkdir()
    try:
        for name in reversed(DATASET_ENTRIES):
            if entry_exists(out / name):
                os.replace(out / name, old / name)
        (old / _ALL_ASIDE).touch()
        for name in DATASET_ENTRIES:
            os.replace(staging / name, out / name)
    except BaseException:
        finish_interrupted_swap(out)
        raise
    shutil.rmtree(old)


def finish_interrupted_swap(out: str | Path) -> None:
    """Undo what a killed :func:`pmod.data.synth.generate` left in ``out``: a swap that did not reach
    ``train.json`` gives the earlier set back (a finished one just drops it), and staging folders are removed. Run
    under the folder's lock."""
    out = Path(out)
    old = out / _OLD_NAME
    if old.is_dir():
        if not entry_exists(out / "train.json"):  # the new set was not complete: the old one comes back
            if (old / _ALL_ASIDE).exists():
                for name in DATASET_ENTRIES:
                    remove_entry(out / name)
            for name in DATASET_ENTRIES:
                if entry_exists(old / name):
                    os.replace(old / name, out / name)
        shutil.rmtree(old)
    for stale in out.glob(f"{STAGING_PREFIX}*{PARTIAL_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)
