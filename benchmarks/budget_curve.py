"""One model, any budget (issue 26), on a trained task_check.py run: p-MoD trained (a) at its default budget,
(b) with ``--budget-range``, (c) at each budget, every model then run at every budget by :func:`pmod.set_budget`;
FastV and p-MoD with untrained routers (both on the trained dense model) beside them.

    PYTHONPATH=src python benchmarks/budget_curve.py RUN train NAME   # one model; two at once on 2 cores
    PYTHONPATH=src python benchmarks/budget_curve.py RUN eval         # every row at every budget
    PYTHONPATH=src python benchmarks/budget_curve.py OUT summary RUN...  # the seeds' runs together

RUN is a ``benchmarks/task_check.py`` folder (its ``base-model``, ``data``, trained ``dense`` and settings). NAME is
one of :func:`models`' names. ``eval`` writes ``RUN/curve/budget_curve.json`` and ``accuracy_vs_tflops.png``;
``summary`` writes ``OUT/summary.json`` (every run's result, and per curve and budget the mean and sd over the runs,
and (b) - (c)) and ``OUT/accuracy_vs_tflops.png`` (the means, the sd as error bars).

A budget here is a share of dense's analytic prefill TFLOPs for the task's own prompt (one image, the first held-out
question's text tokens, measured), not ``pmod flops``' default of 64 text tokens: the demo's prompts have 64 vision
tokens and about 16 text tokens, and with 64 text tokens no p-MoD setting goes below 0.57. ``pmod train
--budget-range`` solves its draws for 64 text tokens, so (b)'s range is given in that convention: the one that
covers the same scale factors as BUDGETS on the task's prompt (printed, and kept in the JSON).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pmod
from pmod.analysis.budget import at_budget, cost_ratio, scaled_at_budget
from pmod.analysis.dims import DEFAULT_TEXT_TOKENS, LMDims
from pmod.experiments.demo import DemoSettings
from pmod.experiments.demo_runs import evaluate_model, load_variant, train_config

BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8)


def settings_of(run: Path) -> DemoSettings:
    return DemoSettings.from_dict(json.loads((run / "task_check.json").read_text())["settings"])


def test_records(run: Path) -> list[dict[str, Any]]:
    n = json.loads((run / "task_check.json").read_text())["n_questions"]
    return [r for r in json.loads((run / "data" / "test.json").read_text()) if r.get("image")][:n]


def workload(run: Path) -> tuple[LMDims, dict[str, int]]:
    """The dense model's dims and the task's prompt: one image and the first held-out question's text tokens."""
    model, processor = load_variant(run / "dense")
    dense = evaluate_model(model, processor, run / "data", test_records(run)[:1])
    return LMDims.from_config(model.config), {"n_vision": dense["n_vision"], "n_text": dense["n_text"]}


def default_range(dims: LMDims, task: dict[str, int]) -> str:
    """BUDGETS' ends on the task's prompt as ``--budget-range`` reads them (64 text tokens), for p-MoD's default
    schedule scaled as set_budget scales it."""
    config = pmod.PModConfig()
    ratios = config.layer_ratios(dims.layers)
    ends = [scaled_at_budget(config, ratios, dims, b, "tflops", task) for b in (min(BUDGETS), max(BUDGETS))]
    shares = [cost_ratio(c, dims, n_vision=task["n_vision"], n_text=DEFAULT_TEXT_TOKENS) for c in ends]
    return ",".join(f"{s:.3f}" for s in shares)


def models(dims: LMDims, task: dict[str, int]) -> dict[str, tuple[Any, str | None]]:
    """name -> (the p-MoD config it trains with, its --budget-range)."""
    rows: dict[str, tuple[Any, str | None]] = {"a_default": (pmod.PModConfig(), None)}
    rows["b_range"] = (pmod.PModConfig(), default_range(dims, task))
    for b in BUDGETS:
        rows[f"c_at_{b}"] = (at_budget(pmod.PModConfig(), dims, b, **task), None)
    return rows


def train(run: Path, name: str) -> None:
    dims, task = workload(run)
    config, budget_range = models(dims, task)[name]
    folder = run / "curve" / name
    settings = dataclasses.replace(settings_of(run), budget_range=budget_range)
    result = train_config(config, run / "base-model", run / "data", folder, settings)
    print(json.dumps({"name": name, "range": budget_range, "seconds": result["seconds"]}))


def score(model: Any, processor: Any, run: Path, dense_tflops: float) -> dict[str, Any]:
    result = evaluate_model(model, processor, run / "data", test_records(run))
    return {"accuracy": result["accuracy"], "per_question_kind": result["per_question_kind"],
            "tflops_ratio": round(result["prefill_tflops"] / dense_tflops, 4)}  # fmt: skip


def evaluate(run: Path) -> dict[str, Any]:
    model, processor = load_variant(run / "dense")
    dense = evaluate_model(model, processor, run / "data", test_records(run))  # its tokens: the first question's
    dims, task = LMDims.from_config(model.config), {"n_vision": dense["n_vision"], "n_text": dense["n_text"]}
    out: dict[str, Any] = {"workload": task, "budgets": BUDGETS, "range": default_range(dims, task),
                           "dense": {"accuracy": dense["accuracy"]}, "rows": {}}  # fmt: skip
    trained = {name: run / "curve" / name for name in models(dims, task)}
    on_dense = {"fastv": pmod.FastVConfig(), "untrained_pmod": pmod.PModConfig()}
    for name in [*trained, *on_dense]:
        out["rows"][name] = {}
        for b in BUDGETS:
            model, processor = load_variant(trained.get(name, run / "dense"))
            try:  # a model trained at a high budget has more dense layers (no router) and cannot go as low
                if name in on_dense:
                    pmod.convert(model, at_budget(on_dense[name], dims, b, **task))
                else:
                    pmod.set_budget(model, b, **task)
            except ValueError as err:
                out["rows"][name][str(b)] = {"unreachable": str(err)}
                continue
            out["rows"][name][str(b)] = score(model, processor, run, dense["prefill_tflops"])
            print(name, b, out["rows"][name][str(b)], flush=True)
    (run / "curve" / "budget_curve.json").write_text(json.dumps(out, indent=1))
    plot(out, run / "curve" / "accuracy_vs_tflops.png")
    return out


def curves(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The issue's curves, as (TFLOPs share, accuracy) points: (a) and (b) at every budget, (c) each model at the
    budget it was trained at, FastV and untrained p-MoD; budgets a model cannot reach are left out."""
    rows = result["rows"]
    lines = {"(a) trained at the default": rows["a_default"], "(b) trained with --budget-range": rows["b_range"],
             "(c) trained at each budget": {b: rows[f"c_at_{b}"][b] for b in map(str, result["budgets"])},
             "FastV on dense": rows["fastv"], "p-MoD, untrained routers": rows["untrained_pmod"]}  # fmt: skip
    return {name: sorted((c["tflops_ratio"], c["accuracy"]) for c in cells.values() if "accuracy" in c)
            for name, cells in lines.items()}  # fmt: skip


def summarize(out: Path, runs: list[Path]) -> dict[str, Any]:
    import numpy as np

    results = {str(run): json.loads((run / "curve" / "budget_curve.json").read_text()) for run in runs}
    per_run = [curves(r) for r in results.values()]
    mean = {}
    for name in per_run[0]:
        cells = np.array([[y for _, y in c[name]] for c in per_run])  # runs x budgets (curves reach every budget)
        shares = np.array([[x for x, _ in c[name]] for c in per_run]).mean(0)
        mean[name] = {"tflops_ratio": shares.round(4).tolist(), "accuracy": cells.mean(0).round(4).tolist(),
                      "sd": cells.std(0, ddof=1).round(4).tolist() if len(runs) > 1 else None}  # fmt: skip
    gap = np.array([[yb - yc for (_, yb), (_, yc) in zip(c["(b) trained with --budget-range"],
                                                         c["(c) trained at each budget"], strict=True)]
                    for c in per_run])  # fmt: skip
    dense = [r["dense"]["accuracy"] for r in results.values()]
    summary = {"runs": results, "mean": mean, "dense": dense,
               "b_minus_c_points": {"mean": (100 * gap.mean(0)).round(1).tolist(),
                                    "sd": (100 * gap.std(0, ddof=1)).round(1).tolist() if len(runs) > 1 else None}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_mean(summary, out / "accuracy_vs_tflops.png")
    return summary


def plot_mean(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, line in summary["mean"].items():
        ax.errorbar([100 * x for x in line["tflops_ratio"]], line["accuracy"], yerr=line["sd"], marker="o",
                    capsize=3, label=name)  # fmt: skip
    dense = summary["dense"]
    ax.scatter([100], [sum(dense) / len(dense)], color="black", label="dense", zorder=5)
    ax.set_xlabel("prefill TFLOPs, % of dense (the task's prompt)")
    ax.set_ylabel(f"accuracy, mean of {len(dense)} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves(result).items():
        ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.scatter([100], [result["dense"]["accuracy"]], color="black", label="dense", zorder=5)
    ax.set_xlabel("prefill TFLOPs, % of dense (the task's prompt)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run, verb = Path(sys.argv[1]), sys.argv[2]
    if verb == "train":
        train(run, sys.argv[3])
    elif verb == "eval":
        evaluate(run)
    elif verb == "summary":
        summarize(run, [Path(p) for p in sys.argv[3:]])
    else:
        raise SystemExit(f"unknown verb {verb!r}; use train NAME, eval or summary RUN...")
