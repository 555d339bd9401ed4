"""pmod.core.files: atomic files and folders, one writer per output folder, output paths checked up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pmod.core.errors import UserError
from pmod.core.files import (
    LOCK_NAME,
    OutputLock,
    atomic_folder,
    atomic_write_json,
    check_output_folder,
    remove_stale_partials,
)


def test_output_folder_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(UserError, match=r"--out .*out is an existing file, not a folder"):
        check_output_folder(target)
    assert target.read_text() == "x"


def test_unwritable_output_folder_is_refused(tmp_path):
    # A path under a regular file cannot be created by anyone, root included.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match=r"--output-dir .* cannot be written"):
        check_output_folder(blocker / "sub", "--output-dir")


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with OutputLock(tmp_path, "pmod train", "--output-dir"):
        code = (
            "import sys; from pmod.core.files import OutputLock; from pmod.core.errors import UserError\n"
            f"try:\n    OutputLock({str(tmp_path)!r}, 'pmod eval').__enter__()\n"
            "except UserError as e:\n    print(e); sys.exit(3)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 3, done.stderr
        assert f"is in use by pmod train (pid {os.getpid()})" in done.stdout
    # released: the same process (or another) can take it again, and a finished run leaves no lock file behind
    with OutputLock(tmp_path, "pmod eval"):
        assert (tmp_path / LOCK_NAME).read_text() == f"pmod eval (pid {os.getpid()})"
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_waiter_on_a_removed_lock_file_locks_the_new_one(tmp_path):
    import fcntl

    first = OutputLock(tmp_path, "first").__enter__()
    late = os.open(tmp_path / LOCK_NAME, os.O_RDWR)  # opened just before the holder finishes and removes the file
    first.__exit__(None, None, None)
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the removed file's lock is free: holding it guards nothing
    with OutputLock(tmp_path, "second"):  # so the next writer must (and does) lock the file that is there now
        assert not os.path.samestat(os.fstat(late), os.stat(tmp_path / LOCK_NAME))
        with pytest.raises(UserError, match="in use by second"):
            OutputLock(tmp_path, "third").__enter__()
    os.close(late)


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    lock = f"OutputLock({str(tmp_path)!r}, 'x').__enter__()"
    code = f"import os; from pmod.core.files import OutputLock; {lock}; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / LOCK_NAME).exists()  # the file stays, the lock went with the process
    with OutputLock(tmp_path, "pmod train"):
        pass


def test_atomic_folder_leaves_old_contents_when_the_block_fails(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging left behind


def test_atomic_folder_replaces_only_when_asked(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(UserError, match="already exists and is not empty"), atomic_folder(out):
        pass
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_staging_is_removed_and_an_interrupted_swap_restored(tmp_path):
    out = tmp_path / "model"
    (tmp_path / ".model.abc.partial").mkdir()  # a killed writer's staging
    old = tmp_path / ".model.old.partial"  # killed between moving the old copy aside and moving the new one in
    old.mkdir()
    (old / "a.txt").write_text("old")
    removed = remove_stale_partials(out)
    assert [p.name for p in removed] == [".model.abc.partial"]
    assert (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_write_json_never_leaves_half_a_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}


def test_a_run_that_fails_before_writing_leaves_no_folder_it_created(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    for folder in (new, old):
        with pytest.raises(RuntimeError), OutputLock(folder, "pmod train"):
            raise RuntimeError("a mistake found after the lock was taken")
    assert not new.exists() and old.is_dir()  # the user's own (empty) folder stays
    with OutputLock(new, "pmod train"):
        (new / "result.json").write_text("{}")
    assert [p.name for p in new.iterdir()] == ["result.json"]
