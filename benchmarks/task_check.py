"""Is a synthetic task token-sensitive? Train the demo's dense model on it, then ask it again with a quarter of the
vision tokens from layer 2 (FastV's ranking, and a random draw) and about blank images (issue 24's checks).

    PYTHONPATH=src python benchmarks/task_check.py OUT task=scenes steps=500 question_kinds=count,half

Also: the same random quarter kept from other layers (``random25_from_K``, :data:`DEPTHS`), which shows at which
depth the model reads the image (BENCHMARKS.md, issue 24's runs K).

``key=value`` arguments set fields of :class:`pmod.experiments.demo.DemoSettings` (tuples comma-separated). Writes
``OUT/task_check.json``: the settings, the answer-prior baseline and, per row, accuracy and accuracy per question
kind on the held-out image questions. The same rows are in ``pmod ablate`` (``check_fastv``, ``check_random``,
``check_blind``); this script is the quick one-model version used to design the scenes task (BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from pmod.core.convert import convert
from pmod.experiments.ablate_variants import CHECK_KEEP
from pmod.experiments.demo import DemoSettings, run_demo
from pmod.experiments.demo_report import prior_baseline
from pmod.experiments.demo_runs import evaluate_model, load_variant
from pmod.methods import FastVConfig

#: Where the model reads the image: a random quarter of the vision tokens kept from layer K for these K (K = 2 is
#: ``random25``). A model that answers as well from K = 2 on as dense has read what it needs in layers 0 and 1.
DEPTHS = (1, 3, 4, 6)
ROWS = {  # row -> (training-free config on the trained dense model, blank images)
    "dense": (None, False),
    "blind": (None, True),
    "fastv25": (FastVConfig(layer=2, keep=CHECK_KEEP), False),
    "random25": (FastVConfig(layer=2, keep=CHECK_KEEP, ranking="random"), False),
    **{f"random25_from_{k}": (FastVConfig(layer=k, keep=CHECK_KEEP, ranking="random"), False) for k in DEPTHS},
}


def settings_from(pairs: list[str]) -> DemoSettings:
    fields = {f.name: f for f in dataclasses.fields(DemoSettings)}
    default = DemoSettings()
    given = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in fields:
            raise SystemExit(f"{key} is not a DemoSettings field; choose from {', '.join(fields)}")
        old = getattr(default, key)
        if key in ("question_kinds", "variants"):
            given[key] = tuple(value.split(","))
        elif isinstance(old, bool) or str(fields[key].type).startswith("bool"):  # bool, or bool | None
            given[key] = value.lower() in ("1", "true", "yes")
        else:
            given[key] = value if old is None else type(old)(value)
    return dataclasses.replace(default, variants=("dense",), **given)


def main(out: Path, settings: DemoSettings) -> dict:
    started = time.time()
    run_demo(out, settings)
    data = out / "data"
    test = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")][: settings.eval_samples]
    result = {"settings": settings.to_dict(), "n_questions": len(test), "prior": prior_baseline(data, test)}
    for name, (config, blank) in ROWS.items():
        model, processor = load_variant(out / "dense")
        if config is not None:
            convert(model, config)
        scores = evaluate_model(model, processor, data, test, blank_images=blank)
        result[name] = {"accuracy": scores["accuracy"], "per_question_kind": scores["per_question_kind"]}
    result["seconds"] = round(time.time() - started, 1)
    (out / "task_check.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), settings_from(sys.argv[2:])), indent=1))
