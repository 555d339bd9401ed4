"""Runs of ``pmod ablate`` (and of ``pmod demo --seeds``): one unit per variant and seed, trained side by side,
evaluated as it ends and written to its own folder at once, so that a killed run loses at most the units that were
running and a rerun skips the finished ones.

A unit trains its variant from its seed's base model (the same frozen tower for every seed; projector, decoder and
routers initialised by the seed, which also sets the data order) and evaluates it on the held-out questions; a
training-free unit (FastV, PyramidDrop, DART) converts the trained dense model of its seed instead, and gamma-MoD
takes its layers from the ARank of that dense model (``pmod arank``). Every unit of a run uses the same number of
torch threads, so a resumed run computes what an uninterrupted one does, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from argparse import Namespace
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from pmod.core.config import MethodConfig
from pmod.core.errors import UserError
from pmod.core.files import atomic_write_json
from pmod.experiments.demo import DemoSettings
from pmod.experiments.demo_runs import evaluate_model, load_variant, train_config
from pmod.methods import GammaMoDConfig

#: Samples ``pmod arank`` averages over for gamma-MoD's layer choice (the paper's 50).
ARANK_SAMPLES = 50


@dataclass(frozen=True)
class Unit:
    """One variant at one seed. ``config`` is None for dense; gamma-MoD's ``layers="arank"`` is resolved from the
    dense model of the same seed when the unit runs. ``blank_images``: evaluated on blank images (a control), and a
    trained unit is trained on them too (``Layout.blank_data``)."""

    variant: str
    seed: int
    config: MethodConfig | None
    trained: bool = True
    needs_dense: bool = False
    blank_images: bool = False

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass(frozen=True)
class Layout:
    """Where a run keeps its parts under ``out``."""

    out: Path

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def blank_data(self) -> Path:
        """The data with every image blank, for the rows trained without images."""
        return self.out / "data-blank"

    @property
    def tower(self) -> Path:
        """The base model whose vision tower was pre-trained (seed: the settings' first)."""
        return self.out / "base-model"

    def base(self, seed: int) -> Path:
        return self.out / "seeds" / f"seed{seed}" / "base-model"

    def run(self, variant: str, seed: int) -> Path:
        return self.out / "runs" / variant / f"seed{seed}"

    def result(self, variant: str, seed: int) -> Path:
        return self.run(variant, seed) / "result.json"


def fingerprint(unit: Unit, settings: DemoSettings) -> str:
    """What a unit's result depends on besides its seed: the task and budget, and the unit's config. A stored
    result is reused only when this matches (so a folder run again with other settings trains again)."""
    # the task's defaults written out: a unit stored under older defaults is not taken for this one
    task = {k: v for k, v in settings.to_dict().items() if k not in ("seeds", "variants", "method_settings")}
    config = None if unit.config is None else {"method": unit.config.method, **unit.config.to_dict()}
    return json.dumps({"task": task, "config": config, "trained": unit.trained, "blank_images": unit.blank_images},
                      sort_keys=True, default=str)  # fmt: skip


# ------------------------------------------------------------------------------------------------ one unit
#: Where a unit reports its training steps: a queue in worker processes, the progress bar in this process.
_report_step: Callable[[str, int], None] | None = None


class StepReporter(TrainerCallback):
    """Reports every finished training step of a unit (for the run's progress bar and ETA)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if _report_step is not None:
            _report_step(self.key, state.global_step)


def with_arank(config: GammaMoDConfig, dense: Path, data: Path, folder: Path) -> GammaMoDConfig:
    """gamma-MoD's layers from the ARank of the trained dense model (``pmod arank``; its JSON and plot are kept in
    ``folder``). Measured afresh every time: a unit that runs again may follow a dense model trained again."""
    from pmod.recipes import arank

    out = folder / "arank.json"
    args = Namespace(model=str(dense), data=str(data / "train.json"), image_folder=None, samples=ARANK_SAMPLES,
                     variant="scores", threshold_rank=config.threshold_rank, max_length=2048,
                     plot=str(folder / "arank.png"), out=str(out), json=False, device="auto")  # fmt: skip
    arank.run(args)
    values = json.loads(out.read_text())["arank"]
    return GammaMoDConfig(**{**config.to_dict(), "arank": values}).resolved(len(values))


def run_unit(unit: Unit, layout: Layout, settings: DemoSettings, test: list[dict[str, Any]]) -> dict[str, Any]:
    """Train (or convert) and evaluate one unit; its result goes to ``result.json`` in its folder, its logs to
    ``log.txt``. Non-finite losses are skipped and counted by the trainer; non-finite weights are counted here."""
    from pmod.core.convert import convert

    folder = layout.run(unit.variant, unit.seed)
    folder.mkdir(parents=True, exist_ok=True)
    dense = layout.run("dense", unit.seed)
    with open(folder / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        config = unit.config
        if isinstance(config, GammaMoDConfig) and config.layers == "arank" and config.arank is None:
            config = with_arank(config, dense, layout.data, folder)
        data = layout.blank_data if unit.blank_images else layout.data  # a trained blank row never sees an image
        if unit.trained:
            reporter = [StepReporter(unit.key)]
            run = train_config(config, layout.base(unit.seed), data, folder, settings, unit.seed, reporter)
            model, processor = load_variant(folder)
        else:
            model, processor = load_variant(dense)
            if config is not None:
                convert(model, config)
            run = {"seconds": 0.0, "cpu_seconds": 0.0, "loss": [], "nonfinite_loss_steps": 0}
        result = evaluate_model(model, processor, layout.data, test, blank_images=unit.blank_images)
        result.update(
            fingerprint=fingerprint(unit, settings),
            variant=unit.variant,
            seed=unit.seed,
            method=config.method if config is not None else "dense",
            config=config.to_dict() if config is not None else None,
            trained_on=data.name if unit.trained else None,
            train_seconds=run["seconds"],
            train_cpu_seconds=run["cpu_seconds"],
            loss=run["loss"],
            nonfinite_loss_steps=run["nonfinite_loss_steps"],
            nonfinite_parameters=sum(int(not torch.isfinite(p).all()) for p in model.parameters()),
        )
    atomic_write_json(layout.result(unit.variant, unit.seed), result)  # a resumed run never reads half a file
    return result


def _init_worker(queue: Any, threads: int) -> None:
    global _report_step
    torch.set_num_threads(threads)
    _report_step = lambda key, step: queue.put((key, step))  # noqa: E731


# ----------------------------------------------------------------------------------------- many units
class InProcess:
    """A one-worker executor that runs each unit at once in this process (one core, or a GPU)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - the caller records the failure and goes on
            future.set_exception(err)
        return future

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


def unit_workers(n_units: int) -> int:
    """Units run at once: one per CPU core (each single-threaded), or one at a time on a GPU."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(n_units, os.cpu_count() or 1))


def run_units(
    units: list[Unit],
    layout: Layout,
    settings: DemoSettings,
    test: list[dict[str, Any]],
    threads: int,
    workers: int,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run every unit not finished yet (those with a ``result.json`` are read back), ``workers`` at a time with
    ``threads`` torch threads each; a unit that needs its seed's dense model waits for it. Returns the results and
    the failures (key -> message) by unit key; a failed unit is reported and the others go on."""
    global _report_step
    results, todo = finished_units(units, layout, settings)
    if results:
        say(f"resuming: {len(results)} of {len(units)} units already finished, {len(todo)} to run")
    if not todo:
        return results, {}
    progress = Progress({u.key: settings.steps if u.trained else 0 for u in todo})
    own_threads = torch.get_num_threads()
    pool, queue = start_pool(workers, threads, progress.advance)
    run = Scheduler(layout, settings, test, pool, workers, progress, results, len(units))
    try:
        while todo or run.running:
            run.submit_ready(todo)
            if not run.running:  # what is left waits for a dense unit this run does not have
                run.failures.update({u.key: f"needs dense/seed{u.seed}, which this run does not train" for u in todo})
                break
            finished, _ = wait(list(run.running), timeout=0.5, return_when=FIRST_COMPLETED)
            while queue is not None and not queue.empty():
                progress.advance(*queue.get())
            for future in finished:
                run.collect(future)
    finally:
        _report_step = None
        pool.shutdown(cancel_futures=True)
        progress.bar.close()
        torch.set_num_threads(own_threads)
    return results, run.failures


def finished_units(
    units: list[Unit], layout: Layout, settings: DemoSettings
) -> tuple[dict[str, dict[str, Any]], list[Unit]]:
    """The stored results of the units that finished with these settings (their fingerprint matches), by unit key,
    and the units still to run."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for unit in units:
        path = layout.result(unit.variant, unit.seed)
        stored = json.loads(path.read_text()) if path.is_file() else None
        if stored is not None and stored.get("fingerprint") == fingerprint(unit, settings):
            results[unit.key] = stored
        else:
            todo.append(unit)
    return results, todo


class Progress:
    """The run's progress bar, in training steps: ``steps`` per unit key (0 for a training-free unit; when no unit
    trains, the bar counts finished units instead)."""

    def __init__(self, steps: dict[str, int]) -> None:
        from tqdm.auto import tqdm

        self.steps = steps
        self.done = dict.fromkeys(steps, 0)
        self.bar = tqdm(total=sum(steps.values()) or len(steps), desc="training", unit="step", dynamic_ncols=True)

    def advance(self, key: str, step: int) -> None:
        """Unit ``key`` has finished ``step`` training steps."""
        step = min(step, self.steps[key])
        self.bar.update(step - self.done[key])
        self.done[key] = step

    def unit_done(self, key: str) -> None:
        """Unit ``key`` finished without training: one tick when the bar counts units."""
        if not self.steps[key]:
            self.bar.update(0 if any(self.steps.values()) else 1)


def start_pool(workers: int, threads: int, advance: Callable[[str, int], None]) -> tuple[Any, Any]:
    """Where the units run, and the queue on which worker processes report their steps (None: none needed). One
    worker: this process, with ``threads`` torch threads; more: worker processes of ``threads`` threads each, which
    end with this process, even on kill -9."""
    global _report_step
    if workers == 1:
        torch.set_num_threads(threads)
        _report_step = advance
        return InProcess(), None
    from pmod.recipes.workers import spawn_context, worker_pool

    queue = spawn_context().Queue()
    return worker_pool(workers, _init_worker, (queue, threads)), queue


@dataclass
class Scheduler:
    """The units of one run in flight: started when a worker is free (and, where a unit needs it, once its seed's
    dense unit has finished), and collected as they end."""

    layout: Layout
    settings: DemoSettings
    test: list[dict[str, Any]]
    pool: Any
    workers: int
    progress: Progress
    results: dict[str, dict[str, Any]]
    n_units: int
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    running: dict[Future, Unit] = dataclasses.field(default_factory=dict)
    started: float = dataclasses.field(default_factory=time.time)

    def submit_ready(self, todo: list[Unit]) -> None:
        """Start the units of ``todo`` that may run now, while workers are free (removing them from ``todo``); a unit
        whose dense model failed fails without running."""
        for unit in list(todo):
            if len(self.running) >= self.workers:
                break
            dense_key = f"dense/seed{unit.seed}"
            if unit.needs_dense and dense_key in self.failures:
                todo.remove(unit)
                self.failures[unit.key] = f"the dense model of seed {unit.seed} failed"
            elif not unit.needs_dense or dense_key in self.results:
                todo.remove(unit)
                self.running[self.pool.submit(run_unit, unit, self.layout, self.settings, self.test)] = unit

    def collect(self, future: Future) -> None:
        """A finished unit: its result kept, or its failure recorded (and written to ``error.txt`` in its folder).
        A worker process that died ends the run, in one line."""
        unit = self.running.pop(future)
        self.progress.advance(unit.key, self.progress.steps[unit.key])
        error = future.exception()
        if isinstance(error, BrokenProcessPool):
            raise UserError(f"a worker process died while running {unit.key} (killed, or out of memory?); the "
                            f"finished units are kept under {self.layout.out / 'runs'} and a rerun skips "
                            "them")  # fmt: skip
        if error is not None:
            self.failures[unit.key] = f"{type(error).__name__}: {error}"
            folder = self.layout.run(unit.variant, unit.seed)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "error.txt").write_text(self.failures[unit.key] + "\n")
            self.progress.bar.write(f"{unit.key}: FAILED ({self.failures[unit.key]}); see its log.txt")
            return
        self.results[unit.key] = result = future.result()
        how = f"trained in {result['train_seconds']:.0f} s" if unit.trained else "training-free"
        self.progress.bar.write(f"{unit.key}: accuracy {result['accuracy']:.3f}, {how} ({len(self.results)}/"
                                f"{self.n_units} units, {time.time() - self.started:.0f} s)")  # fmt: skip
        self.progress.unit_done(unit.key)
