"""`pmod ablate`: the papers' comparisons on the demo's synthetic task, every variant trained with the same data,
tower, steps and seeds, side by side, and reported with the spread over seeds.

Rows (``pmod.experiments.ablate_variants``): dense; vanilla MoD at p-MoD's TFLOPs; p-MoD's component ladder (MoD ->
+TanhNorm alpha 1 and 0.2 -> +STRing -> +PRD); the schedule shapes at p-MoD's mean retention (constant, linear,
cosine = PRD); gamma-MoD with ARank-chosen layers; the training-free rows on the trained dense model: FastV,
PyramidDrop and DART at p-MoD's TFLOPs, and PyramidDrop and DART at their papers' own settings.

Steps: synthetic data and the pre-trained tower (as ``pmod demo``) -> one base model per seed -> one unit per
variant and seed (``pmod.experiments.ablate_runs``: trained, evaluated and written as it ends) -> prefill latency of
the first seed's models, alternating -> ``report.md``, ``report.json`` and plots (``pmod.experiments.ablate_report``).
``--resume DIR`` continues a run that was stopped, skipping every finished unit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmod.core.errors import UserError
from pmod.core.files import OutputLock, atomic_write_json, check_output_folder
from pmod.data.synth import TASKS
from pmod.experiments.ablate_variants import VARIANTS, parse_variants
from pmod.experiments.demo import DemoSettings, checked_budget_range
from pmod.methods import FastVConfig

#: The folder's record of its run: the settings, so that ``--resume`` continues the same run.
SETTINGS_FILE = "ablate.json"


@dataclass
class AblateSettings:
    """The task and budget (``task``, the demo's settings), the rows and the seeds (``task.seeds`` seeds from
    ``task.seed`` on), and the torch threads of each unit (set when the run starts; None: one per core's share)."""

    task: DemoSettings = field(default_factory=lambda: AblateSettings.default_task())
    variants: tuple[str, ...] = tuple(VARIANTS)
    quick: bool = False
    threads: int | None = None

    @staticmethod
    def default_task() -> DemoSettings:
        """The demo's task, tower and training budget (250 steps of batch 32) with an 8-layer decoder instead of 12,
        so that 10 trained variants x 3 seeds finish within 30 minutes on a 2-core CPU (25 measured)."""
        return DemoSettings(seeds=3, layers=8)

    @classmethod
    def quick_settings(cls) -> AblateSettings:
        """A smoke run (about a minute on 2 cores): the demo's tiny model, 30 steps, 2 seeds; numbers mean nothing."""
        return cls(task=dataclasses.replace(DemoSettings.quick(), seeds=2, steps=30), quick=True)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.task.seed, self.task.seed + self.task.seeds))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "task": self.task.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblateSettings:
        # A run from before the scenes task resumes on its own task; its units train again, since what a unit's
        # result depends on (its fingerprint) now names the task and FastV's ranking.
        return cls(task=DemoSettings.from_dict(data["task"]), variants=tuple(data["variants"]), quick=data["quick"],
                   threads=data["threads"])  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", help=f"comma-separated rows, from {', '.join(VARIANTS)} (default: all; dense is "
                        "always run)")  # fmt: skip
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: 3; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (tiny model; its "
                        "numbers mean nothing)")  # fmt: skip
    parser.add_argument("--out", help="work and report folder (default: ./pmod-ablate)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR, skipping its finished units")
    parser.add_argument("--steps", type=int, help="training steps per variant (default: 250; --quick: 30)")
    parser.add_argument("--seed", type=int, help="the first seed (default: 0); seeds are SEED, SEED+1, ...")
    parser.add_argument("--task", choices=TASKS, help="the synthetic task: scenes (3-8 shapes among clutter; "
                        "default) or shapes (one shape per image)")  # fmt: skip
    parser.add_argument("--budget-range", metavar="LO,HI", help="train every routed row for a range of budgets "
                        "(pmod train --budget-range); each is evaluated at its own config's budget")  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> tuple[Path, AblateSettings]:
    """The output folder and the settings of a new run, or of the run ``--resume`` continues (where ``--seeds`` and
    ``--variants`` may add units, and flags that change the task or the budget are refused)."""
    for flag in ("seeds", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} is {value}; give at least 1")
    if args.resume is not None:
        out = Path(args.resume)
        if args.out is not None and Path(args.out) != out:
            raise UserError(f"--out {args.out} and --resume {args.resume} name different folders; pass only --resume")
        stored = out / SETTINGS_FILE
        if not stored.is_file():
            raise UserError(f"--resume {out}: no pmod ablate run there (no {SETTINGS_FILE}); start one with "
                            f"`pmod ablate --out {out}`")  # fmt: skip
        settings = AblateSettings.from_dict(json.loads(stored.read_text()))
        given = {"--quick": (args.quick or None, settings.quick or None), "--steps": (args.steps, settings.task.steps),
                 "--seed": (args.seed, settings.task.seed), "--task": (args.task, settings.task.task),
                 "--budget-range": (checked_budget_range(args.budget_range), settings.task.budget_range)}  # fmt: skip
        for flag, (value, before) in given.items():
            if value is not None and value != before:
                raise UserError(f"{flag} differs from the run in {out} ({value} vs {before}); resume without it, "
                                "or start a new run with another --out")  # fmt: skip
    else:
        out = Path(args.out or "pmod-ablate")
        if (out / SETTINGS_FILE).is_file():
            raise UserError(f"{out} already holds a pmod ablate run; continue it with `pmod ablate --resume {out}`, "
                            "or choose another --out")  # fmt: skip
        settings = AblateSettings.quick_settings() if args.quick else AblateSettings()
        if args.steps is not None:
            settings.task.steps = args.steps
        if args.seed is not None:
            settings.task.seed = args.seed
        if args.task is not None:
            settings.task.task = args.task
        settings.task.budget_range = checked_budget_range(args.budget_range)
    if args.seeds is not None:
        settings.task.seeds = args.seeds
    if args.variants is not None:
        settings.variants = parse_variants(args.variants)
    return out, settings


def run(args: argparse.Namespace) -> int:
    out, settings = settings_from_args(args)
    report = run_ablation(out, settings)
    print(report["table"])
    if report["failures"]:
        print(f"\n{len(report['failures'])} unit(s) failed; see report.md. `pmod ablate --resume {out}` runs them "
              "again.")  # fmt: skip
    print(f"\nreport: {out / 'report.md'}")
    return 1 if report["failures"] else 0


def run_ablation(out: Path, settings: AblateSettings, say=print) -> dict[str, Any]:
    """Run (or continue) the ablation in ``out`` and return the report (also written as report.json / report.md).
    Every finished unit is on disk at once; calling this again on the same folder skips them."""
    import torch
    import transformers

    threads = torch.get_num_threads()
    out = check_output_folder(out, "--out")
    transformers.utils.logging.disable_progress_bar()  # model loads would draw a bar each between the run's lines
    try:
        with OutputLock(out, "pmod ablate"):  # a second run into the folder would mix its units in
            return _run(out, settings, say)
    finally:
        transformers.utils.logging.enable_progress_bar()
        torch.set_num_threads(threads)


def _run(out: Path, settings: AblateSettings, say) -> dict[str, Any]:
    import torch

    from pmod.experiments.ablate_report import write_report
    from pmod.experiments.ablate_runs import Layout, Unit, run_units, unit_workers
    from pmod.experiments.ablate_variants import variant_configs
    from pmod.experiments.demo_runs import make_blank_data, make_data, seed_base_model, threads_per_worker

    started = time.time()
    task, layout = settings.task, Layout(out)
    if settings.quick:
        say("pmod ablate --quick: a smoke run of the machinery (tiny model, few steps); its numbers mean nothing.")
    n_units = len(settings.variants) * task.seeds
    if settings.threads is None:  # fixed for the life of the run: the same threads give the same numbers
        settings.threads = threads_per_worker(unit_workers(n_units))
    atomic_write_json(out / SETTINGS_FILE, settings.to_dict())
    torch.set_num_threads(settings.threads)
    make_data(layout.data, task)
    if any(VARIANTS[name].trained and VARIANTS[name].blank_images for name in settings.variants):
        make_blank_data(layout.data, layout.blank_data)
    tower = prepare_tower(layout.tower, layout.data, task)
    for seed in settings.seeds:
        seed_base_model(layout.tower, layout.base(seed), task, seed)
    test = [r for r in json.loads((layout.data / "test.json").read_text()) if r.get("image")][: task.eval_samples]
    workload = prompt_workload(layout.tower, layout.data, test)
    configs = variant_configs(settings.variants, workload)
    units = [Unit("dense", seed, None) for seed in settings.seeds]  # first: training-free rows and gamma-MoD need them
    for seed in settings.seeds:
        for name in settings.variants:
            if name != "dense":
                v, config = VARIANTS[name], configs[name]
                if isinstance(config, FastVConfig) and config.ranking == "random":  # each seed its own draw
                    config = dataclasses.replace(config, seed=seed)
                units.append(Unit(name, seed, config, trained=v.trained, needs_dense=v.needs_dense,
                                  blank_images=v.blank_images))  # fmt: skip
    workers = unit_workers(n_units)
    say(f"pmod ablate: {len(settings.variants)} variants x {task.seeds} seeds, {task.steps} steps each, {workers} "
        f"at a time ({settings.threads} thread(s) each) -> {out}")  # fmt: skip
    resumed = any(layout.result(u.variant, u.seed).is_file() for u in units)
    results, failures = run_units(units, layout, task, test, settings.threads, workers, say)
    latency = measure_latency(layout, settings, results, test)
    elapsed = time.time() - started
    report = write_report(out, settings, results, failures, latency, workload, tower, workers, elapsed, test, resumed)
    report["total_seconds"] = round(time.time() - started, 1)  # this invocation's (a resumed run: the rest)
    atomic_write_json(out / "report.json", report)
    return report


def prepare_tower(folder: Path, data: Path, task: DemoSettings) -> dict[str, Any]:
    """The base model of the first seed with its tower pre-trained (as the demo does); kept once finished
    (``tower.json`` holds the pre-training result and is written last)."""
    from pmod.experiments.demo_runs import build_base_model, pretrain_vision

    done = folder / "tower.json"
    if done.is_file():
        return json.loads(done.read_text())
    model, processor = build_base_model(task, task.seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    result = pretrain_vision(folder, data, task)
    atomic_write_json(done, {"accuracy": result["accuracy"], "loss": result["loss"]})
    return result


def prompt_workload(model_folder: Path, data: Path, test: list[dict[str, Any]]):
    """The analytic cost's workload: the language model's shape and the token counts of the first test prompt
    (as the demo's report counts them)."""
    from pmod.analysis.dims import LMDims
    from pmod.experiments.ablate_variants import Workload
    from pmod.experiments.demo_runs import load_variant, question_and_answer, record_image
    from pmod.io.model_folder import encode

    model, processor = load_variant(model_folder)
    sample = encode(processor, model, [question_and_answer(test[0])[0]], [[record_image(data, test[0])]])
    n_vision = int((sample["input_ids"] == model.config.image_token_id).sum())
    return Workload(LMDims.from_config(model.config), n_vision, int(sample["input_ids"].shape[1]) - n_vision)


def measure_latency(layout, settings: AblateSettings, results: dict[str, dict], test: list[dict]) -> dict[str, float]:
    """Median prefill latency (ms) of the first seed's model of every finished variant, measured in turns."""
    from pmod.core.config import method_class
    from pmod.core.convert import convert
    from pmod.experiments.demo_runs import load_variant, measure_prefill_models

    seed = settings.seeds[0]
    loaded = {}
    for name in settings.variants:
        result = results.get(f"{name}/seed{seed}")
        if result is None or VARIANTS[name].blank_images:  # a blank-image control runs the dense model: no row
            continue
        if VARIANTS[name].trained:
            loaded[name] = load_variant(layout.run(name, seed))
        else:
            model, processor = load_variant(layout.run("dense", seed))
            loaded[name] = (convert(model, method_class(result["method"]).from_dict(result["config"])), processor)
    latency = measure_prefill_models(loaded, layout.data, test, reps=7) if loaded else {}
    blank = [n for n in settings.variants if VARIANTS[n].blank_images and f"{n}/seed{seed}" in results]
    return {**latency, **{n: latency["dense"] for n in blank if "dense" in latency}}  # the same (dense) model
