"""Writing results without losing or mixing them: atomic files and folders, one writer per output folder, and an
output path checked before any work is done.

Every pmod command that writes a folder uses these, so that a killed run leaves either the old result or the new
one (never half of each), two runs into one folder cannot silently overwrite each other, and an unwritable or
mistaken ``--out`` is refused before the first step instead of after the last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmod.core.errors import UserError

#: The lock file a writing command holds inside its output folder (``fcntl.flock``: the kernel releases it when
#: the process dies, even by ``kill -9``, so a stale lock never blocks a resume). Removed when the run ends.
LOCK_NAME = ".pmod.lock"
#: Written at the top of a folder while a command replaces the files in it one by one (``pmod train``'s final model,
#: which shares its folder with the checkpoints and cannot be swapped in as a whole); it holds what to do, and is
#: removed once the last file is in place. :func:`check_complete` refuses a folder that has it.
INCOMPLETE_NAME = "pmod-save-incomplete.txt"
#: Suffix of the staging copies :func:`atomic_folder` and :func:`atomic_write_text` rename into place.
PARTIAL_SUFFIX = ".partial"


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder this process can write into, created if missing; a one-line :class:`UserError` when it
    is an existing file or cannot be written (checked by writing a probe file, which also catches read-only
    mounts that ``os.access`` misses for root)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is an existing file, not a folder; pass a folder path.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".pmod-write-probe-"):
            pass
    except OSError as err:
        raise UserError(f"{flag} {folder} cannot be written ({err.strerror or err}); pass a folder you can write "
                        f"to.") from err  # fmt: skip
    return folder


def check_complete(folder: str | os.PathLike[str]) -> None:
    """A one-line :class:`UserError` when ``folder`` holds a model whose save was interrupted (it has the
    :data:`INCOMPLETE_NAME` marker), saying what the marker says to do."""
    marker = Path(folder) / INCOMPLETE_NAME
    if marker.is_file():
        try:
            advice = " ".join(marker.read_text(encoding="utf-8").split())
        except OSError:
            advice = ""
        raise UserError(f"{folder} holds an incomplete model: its save was interrupted ({marker.name}). {advice}")


class OutputLock:
    """An exclusive lock on an output folder for the life of one run: a second pmod process that tries to write the
    same folder gets a one-line error naming the holder instead of mixing its results in.

    Use as a context manager (``with OutputLock(out, "pmod train"):``). On systems without ``fcntl`` (Windows)
    the lock is a no-op.
    """

    def __init__(self, folder: str | os.PathLike[str], command: str, flag: str = "--out") -> None:
        self.folder, self.command, self.flag = Path(folder), command, flag
        self._fd: int | None = None
        self._created = False

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self._created = not self.folder.exists()
        check_output_folder(self.folder, self.flag)
        path = self.folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"{self.flag} {self.folder} is in use by {holder}; wait for it to finish or "
                                    f"pass another {self.flag}.") from err  # fmt: skip
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # the holder removed the file between our open and flock: lock the new one instead
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.command} (pid {os.getpid()})".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fd is not None:
            # Removed while still held, so that a finished run leaves nothing behind; a process that opened the old
            # file meanwhile sees it is gone (_same_file) and locks a new one. A killed run leaves the file, unlocked.
            (self.folder / LOCK_NAME).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
            if self._created:  # a run that failed before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.folder.rmdir()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a resumed run) sees the old file or the new one, never
    half of one: a staging file beside it, flushed, then renamed over it."""
    path = Path(path)
    staging = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(staging, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dumps: Any) -> None:
    """:func:`atomic_write_text` of ``json.dumps(data, indent=2, **dumps)`` and a final newline."""
    atomic_write_text(path, json.dumps(data, indent=2, **dumps) + "\n")


def check_new_folder(out: str | os.PathLike[str], replace: bool = False) -> Path:
    """Refuse an ``out`` that :func:`atomic_folder` would refuse, so a command can check it before any work: an
    existing file, or (without ``replace``) a folder that is not empty."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is an existing file, not a folder; pass a folder path.")
    if not replace and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; pass a new folder or remove it first.")
    return out


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """A hidden staging folder next to ``out`` that becomes ``out`` when the block succeeds and is removed when it
    fails, so that ``out`` is either complete or as it was.

    ``replace=False``: ``out`` must not exist (an empty folder is fine). ``replace=True``: an existing ``out`` is
    swapped out only after the new one is complete (the old one is renamed aside, the new one renamed in, the old
    one deleted), so a kill at any point leaves a complete folder under ``out``, or the old one beside it, which
    :func:`remove_stale_partials` (called on entry) puts back. Staging left by a killed run is named
    ``.<out>.*.partial`` and removed by it too.
    """
    out = check_new_folder(out, replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL_SUFFIX, dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = _old_copy(out)
            os.replace(out, old)  # a kill from here to the next line leaves the old copy, restored next time
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _old_copy(out: Path) -> Path:
    return out.with_name(f".{out.name}.old{PARTIAL_SUFFIX}")


def remove_stale_partials(out: str | os.PathLike[str]) -> list[Path]:
    """Remove the staging folders and files that a killed :func:`atomic_folder` / :func:`atomic_write_text` left
    beside ``out``; returns what was removed. Safe only while no other process writes ``out`` (hold its lock)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    if not out.exists() and _old_copy(out).is_dir():  # killed while swapping: the old copy is the complete one
        os.replace(_old_copy(out), out)
    stale = list(out.parent.glob(f".{out.name}.*{PARTIAL_SUFFIX}"))
    stale += [p for p in (out.with_name(out.name + PARTIAL_SUFFIX),) if p.exists()]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale
