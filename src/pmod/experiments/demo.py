"""`pmod demo`: train a small LLaVA model dense and with p-MoD on a synthetic VQA task, then compare accuracy,
cost and what the routers learned. Nothing is downloaded; everything runs on a CPU in minutes.

Steps: synthetic data (``pmod data synth``; default the scenes task) -> a small LLaVA model (ViT tower, 2-layer MLP
projector, Llama decoder, word-level tokenizer) saved to a folder -> the same training recipe (``pmod train``) for
each variant with the same seed, data and steps -> exact-match accuracy on the held-out split, analytic prefill
TFLOPs and KV bytes (``pmod flops``), measured prefill latency -> ``report.md``, ``report.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pmod.core.config import MethodConfig, method_names
from pmod.methods import MoDConfig, PModConfig
from pmod.recipes import method_flags


@dataclass
class DemoSettings:
    """Size of the task and the model, and the training budget. ``quick`` is the smoke version of about a minute."""

    # The synthetic task (pmod.data.synth.TASKS): "scenes", 3-8 shapes among clutter whose answers need many vision
    # tokens (the default, issue 24: the ablation tells rows apart on it, BENCHMARKS.md), or "shapes", one shape per
    # image (the demo's task until 2026-12-04: a few tokens carry the whole answer, so every method scores alike).
    task: str = "scenes"
    samples: int = 3000
    # Questions per image (None: the generator's mix of one and two). Two gives each image one of each default kind
    # (shapes: position questions then learned within 250 steps instead of about 400).
    turns: int | None = 2
    image_size: int = 64
    patch_size: int = 8
    # The shapes task only: one shape per image, questions about its colour and position.
    max_shapes: int = 1
    # None: the task's default kinds (TASK_DEFAULTS).
    question_kinds: tuple[str, ...] | None = None
    layers: int = 12
    hidden: int = 128
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_feature_layer: int = -2  # LLaVA's choice: the second-to-last tower layer
    # per-patch pre-training of the tower (pmod.experiments.vision_pretrain), then frozen
    vision_pretrain_steps: int = 300
    # True: the tower's attention outputs are zero and stay so, so each image token carries its own patch only.
    # None: the task's default (TASK_DEFAULTS).
    vision_patch_local: bool | None = None
    steps: int = 250
    batch_size: int = 32
    # "LO,HI": every trained routed variant runs each step at a budget drawn from this range of dense's TFLOPs
    # (`pmod train --budget-range`), so one model serves them all; None: each at its own config's budget.
    budget_range: str | None = None
    learning_rate: float = 1e-3
    eval_samples: int = 200
    seed: int = 0
    # Seeds per variant: seed, seed + 1, ... (the first is the demo's run; more give the spread of the results).
    seeds: int = 1
    variants: tuple[str, ...] = ("dense", "pmod")
    # Settings given as ``--<method>-<field>`` flags, per method, on top of the variants' configs.
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def variant_config(self, name: str) -> MethodConfig | None:
        """The method config variant ``name`` trains (None: the dense baseline)."""
        base = VARIANTS[name]
        if base is None:
            return None
        return method_flags.build_config(base.method, self.method_settings.get(base.method, {}), base)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The question kinds asked: ``question_kinds``, or the task's default (:data:`TASK_DEFAULTS`)."""
        return self.question_kinds or TASK_DEFAULTS[self.task].kinds

    @property
    def patch_local(self) -> bool:
        """Whether the tower is patch-local: ``vision_patch_local``, or the task's default (:data:`TASK_DEFAULTS`)."""
        return TASK_DEFAULTS[self.task].patch_local if self.vision_patch_local is None else self.vision_patch_local

    def task_summary(self) -> str:
        """The task in a few words, for the reports."""
        from pmod.data import scenes

        shapes = (f"{scenes.MIN_SHAPES}-{scenes.MAX_SHAPES} shapes among clutter" if self.task == "scenes"
                  else f"at most {self.max_shapes} shape(s)")  # fmt: skip
        tower = "; a patch-local tower: each image token sees its own patch only" if self.patch_local else ""
        return (f"the synthetic {self.task} task ({self.samples} samples, {self.image_size} px images with {shapes}, "
                f"questions about {', '.join(self.kinds)}{tower})")  # fmt: skip

    def training_summary(self) -> str:
        """The training budget in a few words, for the reports."""
        drawn = "" if self.budget_range is None else (
            f", every trained routed variant at a budget drawn per step from {self.budget_range.replace(',', '-')} "
            "of dense's TFLOPs (`--budget-range`)")  # fmt: skip
        return f"{self.steps} steps of batch {self.batch_size}{drawn}"

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values, with the task's defaults written out (:attr:`kinds`, :attr:`patch_local`), so
        that what a saved run ran stays what it says when the defaults change."""
        data = asdict(self)
        data.update(question_kinds=list(self.kinds), vision_patch_local=self.patch_local)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DemoSettings:
        """The settings :meth:`to_dict` (or, before it, ``dataclasses.asdict``) wrote to JSON, lists back to tuples.
        A dict from before the scenes task is the shapes task's; one from before :data:`TASK_DEFAULTS` keeps what its
        defaults were then (a mixing tower; the scenes task: the generator's default kinds), so a resumed run goes on
        with its own data and tower."""
        data = {"task": "shapes", "vision_patch_local": False, **data}
        kinds = data["question_kinds"]
        if kinds is None and data["task"] == "scenes":  # :meth:`to_dict` writes them out, so this dict is older
            from pmod.data.scenes import DEFAULT_KINDS

            kinds = DEFAULT_KINDS
        return cls(**{**data, "question_kinds": None if kinds is None else tuple(kinds),
                      "variants": tuple(data["variants"])})  # fmt: skip

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            samples=600, layers=8, hidden=64, vision_hidden=64, vision_pretrain_steps=60, steps=40, batch_size=16,
            eval_samples=64,
        )  # fmt: skip


@dataclass(frozen=True)
class TaskDefaults:
    """What the demo asks about a task, and with which tower, unless the settings say otherwise."""

    kinds: tuple[str, ...]
    patch_local: bool


#: Each task's defaults in the demo. shapes: colour and position, which a small model learns to read off one shape
#: within minutes. scenes: the two scene-wide kinds, count and half, with a patch-local tower (BENCHMARKS.md, issue
#: 24's run K: dense 0.86 over 3 seeds within 250 steps); the kinds that name a colour or a kind stay at their
#: priors within the demo's budget, and a mixing tower gathers the count into every token, so a quarter of the
#: tokens still holds it.
TASK_DEFAULTS: dict[str, TaskDefaults] = {
    "scenes": TaskDefaults(kinds=("count", "half"), patch_local=True),
    "shapes": TaskDefaults(kinds=("color", "position"), patch_local=False),
}

#: Variants the demo can train: name -> method config (None = the dense baseline).
VARIANTS: dict[str, MethodConfig | None] = {
    "dense": None,
    "pmod": PModConfig(),
    "mod": MoDConfig(ratio=0.5, layers="deep_all"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="pmod-demo", help="work and report folder (default: ./pmod-demo)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (smaller model, fewer "
                        "steps)")  # fmt: skip
    parser.add_argument("--steps", type=int, help="training steps per variant")
    parser.add_argument("--samples", type=int, help="synthetic samples (train + test)")
    parser.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} (default: dense,pmod)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=tuple(TASK_DEFAULTS), default=DemoSettings.task, help="the synthetic task: "
                        "scenes (3-8 shapes among clutter, questions whose answers need many vision tokens; default) "
                        "or shapes (one shape per image: a few tokens carry the answer)")  # fmt: skip
    parser.add_argument("--budget-range", metavar="LO,HI", help="train every routed variant for a range of budgets "
                        "(pmod train --budget-range), so one model serves them all")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="train every variant with N seeds (SEED, SEED+1, ...) and "
                        "report the p-MoD vs dense gap with its spread over them (default: 1)")  # fmt: skip
    methods = sorted({c.method for c in VARIANTS.values() if c is not None}, key=method_names().index)
    method_flags.add_method_arguments(parser, methods)


def checked_budget_range(value: str | None) -> str | None:
    """``--budget-range`` as ``"LO,HI"`` once it parses (a one-line error otherwise); None when not given."""
    if value is None:
        return None
    from pmod.recipes.budget_range import parse_budget_range

    return ",".join(map(str, parse_budget_range(value)))


def run(args: argparse.Namespace) -> int:
    from pmod.core.errors import UserError

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    settings.task = args.task
    if args.seeds < 1:
        raise UserError(f"--seeds is {args.seeds}; give at least 1")
    settings.seeds = args.seeds
    if args.steps is not None:
        settings.steps = args.steps
    if args.samples is not None:
        settings.samples = args.samples
    settings.budget_range = checked_budget_range(args.budget_range)
    if args.variants:
        names = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        unknown = [v for v in names if v not in VARIANTS]
        if unknown or "dense" not in names:
            raise UserError(f"--variants must include 'dense' and come from {', '.join(VARIANTS)}; got {args.variants}")
        settings.variants = names
    given = method_flags.given_method_flags(vars(args))
    trained = {c.method for c in map(VARIANTS.get, settings.variants) if c is not None}
    for key, method in given.items():
        if method not in trained:
            raise UserError(f"--{key.replace('_', '-')} sets {method}, which no variant in --variants trains")
    settings.method_settings = {m: method_flags.method_settings(vars(args), m) for m in trained}
    for name in settings.variants:
        settings.variant_config(name)  # a bad setting fails here, before any work
    report = run_demo(Path(args.out), settings)
    print(report["table"])
    if report.get("seeds_summary"):
        print(f"\n{report['seeds_summary']}")
    print(f"\nreport: {Path(args.out) / 'report.md'}")
    return 0


def run_demo(out: Path, settings: DemoSettings) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the report (also written as report.json / report.md). ``out``
    must be a folder this process can write, and no other run may be writing it (one line otherwise)."""
    from pmod.core.files import OutputLock, check_output_folder

    out = check_output_folder(out, "--out")
    with OutputLock(out, "pmod demo"):  # a second demo into the folder would train over this one's models
        return _run_demo(out, settings)


def _run_demo(out: Path, settings: DemoSettings) -> dict[str, Any]:
    import torch

    from pmod.core.errors import UserError
    from pmod.core.files import atomic_write_json
    from pmod.experiments.demo_runs import (
        build_base_model,
        evaluate,
        make_data,
        measure_prefill,
        pretrain_vision,
        train_variants,
    )

    if not torch.cuda.is_available() and (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)  # on 2 vCPUs a second thread was measured slower (BENCHMARKS.md)
    started = time.time()
    data = out / "data"
    make_data(data, settings)
    base = out / "base-model"
    model, processor = build_base_model(settings, settings.seed)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    vision = pretrain_vision(base, data, settings)
    runs = train_variants(base, data, out, settings)
    test = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")][: settings.eval_samples]
    results = {name: evaluate(run["folder"], data, test) for name, run in runs.items()}
    latency = measure_prefill({name: run["folder"] for name, run in runs.items()}, data, test)
    for name in results:
        results[name]["prefill_ms"] = latency[name]
        results[name]["train_seconds"] = runs[name]["seconds"]
    seeds = None
    if settings.seeds > 1:
        from pmod.experiments.demo_runs import train_more_seeds

        more, failures = train_more_seeds(out, settings, test)
        if failures:
            raise UserError(f"training another seed failed ({'; '.join(f'{k}: {v}' for k, v in failures.items())}); "
                            f"see its log.txt under {out / 'runs'}")  # fmt: skip
        seeds = {name: {settings.seed: results[name], **{r["seed"]: r for r in more.values() if r["variant"] == name}}
                 for name in settings.variants}  # fmt: skip
    from pmod.experiments.demo_report import write_report

    report = write_report(out, settings, runs, results, data, test, vision, seeds)
    report["total_seconds"] = round(time.time() - started, 1)
    atomic_write_json(out / "report.json", report)
    return report
