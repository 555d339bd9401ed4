"""Evaluate models on lmms-eval tasks through lmms-eval's Python API, one (model, task) at a time, so that nothing
is lost when a run dies and nothing is reused that measured something else: each finished (model, task) lands in
``<out>/<task>/<model name>-<key>/``, the key digesting the model's identity, its args, the task and the limit
(:mod:`pmod.eval.measurement`); ``result.json``, written atomically and last, marks it finished, and a rerun with the
same ``out`` reuses exactly the results of the same measurements. One run at a time writes an ``out`` (a lock).

Per finished task: ``result.json`` (the task's metrics from lmms-eval, the cost summed over its requests, the
settings), ``samples.jsonl`` (per document: answer, target and per-sample scores, for the bootstrap) and
``costs/`` (one line per request, :mod:`pmod.eval.cost`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmod.core.errors import UserError
from pmod.eval.budgets import label
from pmod.eval.measurement import finished_key, folder_identity, measurement_key, result_folder, task_identity

#: Prefix of the per-run folder that takes the cost lines a model writes before its first task.
SCRATCH_PREFIX = ".costs-scratch-"
#: Offline, a hub dataset that is not in the local cache cannot be loaded; these say so.
_OFFLINE_SIGNS = ("OfflineModeIsEnabled", "offline", "Couldn't reach", "ConnectionError", "LocalEntryNotFound")


@dataclass
class ModelSpec:
    """A model to evaluate: a folder and model args (``method=fastv,fastv_keep=0.25``), named by ``label``."""

    folder: str
    args: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``DIR`` or ``DIR,key=value,...`` (lmms-eval's model-args syntax); a list value is bracketed or quoted,
        ``pdrop_layers=[2,4,6]``, so that its commas stay in it."""
        folder, _, rest = text.partition(",")
        args = {}
        for item in filter(None, (part.strip() for part in split_model_args(rest))):
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--model {text}: {item!r} is not key=value; write DIR,method=fastv,fastv_keep=0.25 "
                                "(a list in brackets: method=pdrop,pdrop_layers=[2,4,6])")  # fmt: skip
            args[key.strip()] = value.strip()
        return cls(folder, args)

    @property
    def name(self) -> str:
        """The folder's name, plus ``+method`` when one is given and ``@0.40`` at a budget (the label before
        duplicates are numbered)."""
        name = Path(self.folder).resolve().name + (f"+{self.args['method']}" if self.args.get("method") else "")
        return name + (label(self.args["budget"]) if self.args.get("budget") else "")


def split_model_args(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[]":
            depth = depth + 1 if ch == "[" else max(depth - 1, 0)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def label_models(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Give each model a unique folder-safe label: the folder name, plus its method when one is given."""
    seen: dict[str, int] = {}
    for spec in specs:
        base = spec.name
        seen[base] = seen.get(base, 0) + 1
        spec.label = base if seen[base] == 1 else f"{base}-{seen[base]}"
    return specs


def check_eval_install() -> None:
    """lmms-eval importable, and no torchvision that fails at import (it breaks transformers' image processors)."""
    import importlib.util

    if importlib.util.find_spec("lmms_eval") is None:
        raise UserError("pmod eval needs lmms-eval; install pmod's eval extra: pip install -e '.[eval]' (see README).")
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as err:  # a CUDA build beside a CPU torch raises RuntimeError deep in its import
            raise UserError(f"torchvision is installed but fails to import ({str(err).splitlines()[0]}); "
                            f"uninstall it (pip uninstall torchvision) or install the build that matches your "
                            f"torch.") from err  # fmt: skip


def quiet_lmms_eval() -> None:
    """lmms-eval logs (loguru) at DEBUG while it indexes its ~2000 task files; keep its warnings and errors only,
    as its own command line does at ``--verbosity WARNING``."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def task_manager(include_path: list[str], tasks: list[str] | None = None) -> Any:
    """lmms-eval's task index: pmod's tasks (``pmod_shapes``, ``pmod_shapes_mc``), ``include_path`` and, unless
    those hold every task in ``tasks``, lmms-eval's own (indexing its ~2000 YAMLs takes seconds)."""
    from lmms_eval.tasks import TaskManager

    from pmod.eval.tasks import TASKS_DIR

    for path in include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path {path} is not a folder; pass a folder of lmms-eval task YAMLs.")
    paths = [str(TASKS_DIR), *include_path]
    local = TaskManager(verbosity="WARNING", include_path=paths, include_defaults=False)
    if tasks is not None and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(verbosity="WARNING", include_path=paths)


def check_tasks(names: list[str], manager: Any) -> None:
    """Every task known and its documents loadable; one line naming the task and the fix otherwise."""
    import difflib

    from lmms_eval.tasks import get_task_dict

    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown task {name!r}; {hint}list them with `python -m lmms_eval --tasks list`, or "
                            f"add a folder of task YAMLs with --include-path.")  # fmt: skip
        missing = uncached_hub_dataset(name, manager)
        if missing:  # known before lmms-eval retries the hub for seconds
            raise UserError(dataset_error(name, ConnectionError(f"{missing} is not cached (OfflineModeIsEnabled)")))
        try:
            get_task_dict([name], manager)
        except Exception as err:
            raise UserError(dataset_error(name, err)) from err


def uncached_hub_dataset(task: str, manager: Any) -> str | None:
    """The hub dataset a task reads when the hub is off (``HF_HUB_OFFLINE``) and neither the hub cache nor a
    datasets cache holds it; None when it may load (local data, cached, online, or a group we do not look into)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        return None
    try:
        from lmms_eval.utils import load_yaml_config

        path = load_yaml_config(manager.task_index[task]["yaml_path"], mode="simple").get("dataset_path")
    except Exception:
        return None
    if not isinstance(path, str) or path.count("/") != 1 or Path(path).exists():
        return None  # a builder name (json, csv), a local folder, or not a hub id
    import datasets.config
    from huggingface_hub import constants

    org, name = path.split("/")
    caches = [Path(constants.HF_HUB_CACHE) / f"datasets--{org}--{name}"]
    for root in (datasets.config.HF_DATASETS_CACHE, os.environ.get("LMMS_EVAL_DATASETS_CACHE")):
        if root and Path(root).is_dir():
            caches += list(Path(root).glob(f"{org}___{name}*"))
    return None if any(p.exists() for p in caches) else path


def dataset_error(task: str, err: BaseException) -> str:
    """One line for a task whose documents do not load."""
    cause = getattr(err, "last_attempt", None)  # lmms-eval retries with tenacity; the cause is inside
    if cause is not None and cause.exception() is not None:
        err = cause.exception()
    text = " ".join(str(err).split()) or type(err).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline and any(sign in f"{type(err).__name__} {text}" for sign in _OFFLINE_SIGNS):
        return (f"task {task} needs a hub dataset that is not in the local cache and HF_HUB_OFFLINE is set ({text}); "
                f"run it once with network access (unset HF_HUB_OFFLINE) to fill the datasets cache, or use a local "
                f"task such as pmod_shapes.")  # fmt: skip
    return f"task {task}: its documents do not load ({text}); check the task's data (for pmod_shapes: --shapes-data)."


@dataclass
class Measurement:
    """One (model, task) to measure or reuse: the model, its folder for this measurement and the key of what it
    measures (:mod:`pmod.eval.measurement`)."""

    spec: ModelSpec
    task: str
    folder: Path
    key: str
    identity: dict[str, Any]

    @property
    def finished(self) -> bool:
        return finished_key(self.folder) == self.key


def plan(specs: list[ModelSpec], tasks: list[str], out: Path, limit: int | None, batch_size: int,
         model_args: dict[str, Any], manager: Any) -> dict[tuple[str, str], Measurement]:  # fmt: skip
    """(label, task) -> its :class:`Measurement`, keyed by the model's identity, its args, the task and the limit."""
    models = {spec.label: folder_identity(spec.folder) for spec in specs}
    task_ids = {task: task_identity(task, manager) for task in tasks}
    plans = {}
    for spec in specs:
        args = {k: v for k, v in {**model_args, **spec.args}.items() if k != "cost_dir"}
        for task in tasks:
            key, identity = measurement_key(models[spec.label], args, task_ids[task], limit, batch_size)
            plans[spec.label, task] = Measurement(spec, task, result_folder(out, task, spec.name, key), key, identity)
    return plans


def evaluate_models(
    specs: list[ModelSpec],
    tasks: list[str],
    out: Path,
    limit: int | None = None,
    include_path: list[str] | None = None,
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Evaluate every model on every task (reusing the results of the same measurements), then write
    ``report.json`` / ``report.md``; returns the report. ``model_args`` go to every model (``dtype``, ``device``,
    ...); a spec's own args win. The output folder is locked for the run: a second writer gets a one-line error."""
    from pmod.core.files import OutputLock

    lock = OutputLock(out, "pmod eval") if _first_process() else contextlib.nullcontext()
    with lock:
        return _evaluate_locked(specs, tasks, out, limit, include_path, batch_size, model_args or {}, log)


def _evaluate_locked(specs, tasks, out, limit, include_path, batch_size, model_args, log) -> dict[str, Any]:
    from pmod.eval.report import write_report

    log = log or (lambda message: print(message, file=sys.stderr))
    check_eval_install()
    quiet_lmms_eval()
    manager = task_manager(include_path or [], tasks)
    plans = plan(specs, tasks, out, limit, batch_size, model_args, manager)
    todo = {spec.label: [t for t in tasks if not plans[spec.label, t].finished] for spec in specs}
    pending = sorted({t for names in todo.values() for t in names}, key=tasks.index)
    check_tasks(pending, manager)
    for stale in out.glob(".costs-scratch*"):  # a killed run's cost scratch (we hold the lock: none is live)
        shutil.rmtree(stale, ignore_errors=True)
    for spec in specs:
        for task in tasks:
            if task not in todo[spec.label]:
                where = plans[spec.label, task].folder.relative_to(out)
                log(f"{spec.label} / {task}: the same model, settings, task and limit finished in an earlier run "
                    f"({where}), reused")  # fmt: skip
        now = [plans[spec.label, t] for t in todo[spec.label] if not plans[spec.label, t].finished]
        if now:  # (a model given twice is measured once)
            run_model(spec, now, out, limit, manager, batch_size, model_args, log)
    return write_report(out, specs, tasks, {k: m.folder for k, m in plans.items()}, manager)


def _first_process() -> bool:
    """Not one of the later processes of a launcher (they write nothing of their own here)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def run_model(spec: ModelSpec, measurements: list[Measurement], out: Path, limit, manager, batch_size, model_args,
              log) -> None:  # fmt: skip
    """Load one model and evaluate it on the measurements' tasks, writing each task's files as it finishes."""
    import tempfile

    from lmms_eval.evaluator import simple_evaluate

    from pmod.eval.lmms_model import RoutedLMM

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=out))  # this run's own, never another's
    try:
        lm = RoutedLMM(pretrained=spec.folder, batch_size=batch_size, cost_dir=scratch, **{**model_args, **spec.args})
        lm.keep_model = True  # the next task reuses it
        for m in measurements:
            shutil.rmtree(m.folder, ignore_errors=True)  # what a dead run left of this measurement
            lm.set_cost_dir(m.folder / "costs")
            log(f"{spec.label} / {m.task}: evaluating")
            results = simple_evaluate(model=lm, tasks=[m.task], limit=limit, batch_size=batch_size, log_samples=True,
                                      task_manager=manager, verbosity="WARNING")  # fmt: skip
            if results is None:  # not the first of several processes: the first writes
                continue
            write_task(m, results, limit, batch_size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_task(m: Measurement, results: dict[str, Any], limit, batch_size) -> None:
    """The task's samples, then its result (atomically, last: its presence marks the measurement finished)."""
    from pmod.core.files import atomic_write_json
    from pmod.eval.cost import read_costs, summarize

    with (m.folder / "samples.jsonl").open("w", encoding="utf-8") as f:
        for name, samples in results.get("samples", {}).items():
            for s in samples:
                keep = {k: v for k, v in s.items() if k not in ("doc", "arguments", "resps", "doc_hash")}
                f.write(json.dumps({"task": name, **keep}, default=str) + "\n")
    result = {
        "model": m.spec.label, "folder": str(m.spec.folder), "model_args": m.spec.args, "task": m.task,
        "results": results["results"], "higher_is_better": results.get("higher_is_better", {}),
        "n_samples": results.get("n-samples", {}), "cost": summarize(read_costs(m.folder / "costs")),
        "settings": {"limit": limit, "batch_size": batch_size},
        "lmms_eval_version": results.get("lmms_eval_version"),
        "key": m.key, "measured": m.identity,
    }  # fmt: skip
    atomic_write_json(m.folder / "result.json", result, default=str)
