"""What a finished ``pmod eval`` result measured, as a key, and the folder it lives in.

A result is reused by a later run only when that run would measure the same thing: the same model (its resolved
folder, the content of its small files such as config.json, and the size and modification time of its large ones,
the weights), the same model args and settings, the same task (its YAML and, for pmod's shapes tasks, the data
set), the same document limit and batch size. Each key has its own folder, ``<out>/<task>/<model name>-<key>/``,
so a rerun with another ``--limit`` or other settings lands beside the earlier result instead of over it, and a
result is never shown under the name of another model that happens to get the same label in another run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Files up to this size are identified by their content; larger ones (weights) by their size and mtime, so that
#: keying a 14 GB checkpoint costs a stat, not a read.
CONTENT_HASH_BYTES = 1 << 20
#: Hex digits of the key in a result's folder name (the full digest is stored in its result.json).
KEY_DIGITS = 12
#: Bumped when what goes into the key changes, so that older results are measured again rather than misread.
KEY_VERSION = 1


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_identity(folder: str | Path) -> dict[str, Any]:
    """The resolved model folder and, per top-level file (hidden ones and subfolders such as checkpoints left
    out), its content digest when small, else its size and modification time."""
    root = Path(folder).resolve()
    files = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        stat = path.stat()
        files.append([path.name, _digest(path)] if stat.st_size <= CONTENT_HASH_BYTES
                     else [path.name, stat.st_size, stat.st_mtime_ns])  # fmt: skip
    return {"folder": str(root), "files": files}


def task_identity(task: str, manager: Any) -> dict[str, Any]:
    """The task's name, the digest of its YAML (an edited task is another measurement) and, for the tasks that
    read pmod's shapes set, the digest of the set's ``test.json`` (``--shapes-data`` chooses it)."""
    identity: dict[str, Any] = {"task": task}
    try:
        yaml_path = Path(manager.task_index[task]["yaml_path"])
    except (AttributeError, KeyError, TypeError):  # a group or a Python-only task: its name stands for it
        return identity
    if yaml_path.is_file():
        identity["yaml"] = _digest(yaml_path)
        from pmod.eval.tasks import TASKS_DIR

        if yaml_path.resolve().parent == TASKS_DIR:
            from pmod.eval.tasks.shapes import data_folder

            test = data_folder() / "test.json"
            identity["data"] = [str(test), _digest(test) if test.is_file() else None]
    return identity


def measurement_key(model: dict[str, Any], args: dict[str, Any], task: dict[str, Any], limit: int | None,
                    batch_size: int) -> tuple[str, dict[str, Any]]:  # fmt: skip
    """(sha256 hex digest, the identity it digests) of one (model, settings, task, limit) measurement. ``args``
    are every model arg the model is built with (dtype, device, method and its settings, ...)."""
    identity = {
        "version": KEY_VERSION, "model": model, "args": {str(k): str(v) for k, v in sorted(args.items())},
        "task": task, "limit": limit, "batch_size": batch_size,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(), identity


def result_folder(out: Path, task: str, name: str, key: str) -> Path:
    """Where the measurement ``key`` of model ``name`` (its folder name, plus ``+method``) on ``task`` lives."""
    return out / task / f"{name}-{key[:KEY_DIGITS]}"


def finished_key(task_dir: Path) -> str | None:
    """The key of the finished result in ``task_dir`` (its ``result.json`` is written last); None when there is
    none or it is unreadable (a run killed before it finished the task)."""
    try:
        return json.loads((task_dir / "result.json").read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
