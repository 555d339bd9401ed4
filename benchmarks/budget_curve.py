"""One model, any budget (issue 26), on a trained task_check.py run: p-MoD trained (a) at its default budget,
(b) with ``--budget-range``, (c) at each budget, every model then run at every budget by :func:`pmod.set_budget`;
FastV and p-MoD with untrained routers (both on the trained dense model) beside them.

    PYTHONPATH=src python benchmarks/budget_curve.py RUN train NAME   # one model; two at once on 2 cores
    PYTHONPATH=src python benchmarks/budget_curve.py RUN eval         # every row at every budget
    PYTHONPATH=src python benchmarks/budget_curve.py OUT summary RUN...  # the seeds' runs together

RUN is a ``benchmarks/task_check.py`` folder (its ``base-model``, ``data``, trained ``dense`` and settings). NAME is
one of :func:`models`' names. ``eval`` writes ``RUN/curve/budget_curve.json`` and ``accuracy_vs_cost.png``;
``summary`` writes ``OUT/summary.json`` (every run's result, and per curve and budget the means and the accuracy's
sd over the runs, and (b) - (c)) and ``OUT/accuracy_vs_cost.png`` (accuracy against TFLOPs, KV and latency).

* A budget is a share of dense's analytic prefill TFLOPs for the task's own prompt (one image, the first held-out
  question's text tokens, measured), not ``pmod flops``' default of 64 text tokens: the demo's prompts have 64
  vision tokens and about 16 text tokens, and with 64 text tokens no p-MoD setting goes below 0.57. ``pmod train
  --budget-range`` solves its draws for 64 text tokens, so (b)'s range is given in that convention: the one that
  covers the same scale factors as BUDGETS on the task's prompt (printed, and kept in the JSON).
* Every p-MoD model here is :data:`FAMILY`: PRD with every layer after the first routed. With the paper's
  threshold (a layer whose ratio is 0.85 or more stays dense) layers 0-2 of the 12 are dense; they and the text
  tokens cost 0.38 of dense's TFLOPs on the task's prompt, so 0.3 is out of reach (the first curve, with that
  threshold and budgets 0.4-0.8, is kept in ``benchmarks/results/budget_curve/paper_threshold/``).
* (b) and every (c) are trained twice: for the run's steps, as dense, and for 3x as many (``b_range_3x``,
  ``c3x_at_B``: :data:`LONGER`), so that (b) is also compared with (c) when both have had more steps than the
  run's. One (b) at 3x still takes 3/5 of the steps of the five (c) models at 1x. Dense is trained for 3x as long
  too (``dense_3x``, evaluated once): the 3x rows' ceiling.
* (c) at budget B trains exactly the ratios that (a) and (b) run at B (FAMILY's ratios scaled by one factor, as
  :func:`pmod.set_budget` moves a trained model), so (b) - (c) compares training over a range with training at the
  budget and nothing else. The untrained row runs the same ratios with untrained routers.
* Beside accuracy each cell has the analytic KV-cache share and a measured prefill latency share: one forward of
  the eval's first batch (32 prompts), the trained model and dense alternated (ABBA), the ratio of their minima.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import common
import torch

import pmod
from pmod.analysis.budget import at_budget, cost_ratio, scaled_at_budget
from pmod.analysis.dims import DEFAULT_TEXT_TOKENS, LMDims
from pmod.experiments.demo import DemoSettings
from pmod.experiments.demo_runs import evaluate_model, load_variant, question_and_answer, record_image, train_config

#: The issue's budgets, shares of dense's prefill TFLOPs on the task's prompt.
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.8)
#: The p-MoD of every curve model: PRD, every layer after the first routed (see the module's docstring).
FAMILY = pmod.PModConfig(max_ratio=1.0)
#: The curves, by row name, as the summary and the plots name them.
CURVES = {
    "a_default": "(a) trained at the default",
    "b_range": "(b) trained with --budget-range",
    "b_range_3x": "(b) --budget-range, 3x the steps",
    "c": "(c) trained at each budget",
    "c3x": "(c) at each budget, 3x the steps",
    "fastv": "FastV on dense",
    "untrained_pmod": "p-MoD, untrained routers",
}
#: Models trained for 3x the run's steps: (b), (c) and dense again (see the module's docstring).
LONGER = {"b_range_3x": 3, **{f"c3x_at_{b}": 3 for b in BUDGETS}, "dense_3x": 3}
#: The differences the summary gives, in points: (b) - (c), each a pair of CURVES keys.
GAPS = (("b_range", "c"), ("b_range_3x", "c"), ("b_range_3x", "c3x"))
#: Latency timing: warm-up calls and ABBA repetitions per cell.
WARMUP, REPS = 2, 8


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


def scaled(dims: LMDims, task: dict[str, int], budget: float) -> pmod.PModConfig:
    """FAMILY's ratios scaled to ``budget`` on the task's prompt: what set_budget runs (a) and (b) at there."""
    return scaled_at_budget(FAMILY, FAMILY.layer_ratios(dims.layers), dims, budget, "tflops", task)


def default_range(dims: LMDims, task: dict[str, int]) -> str:
    """BUDGETS' ends on the task's prompt as ``--budget-range`` reads them (64 text tokens)."""
    ends = [scaled(dims, task, b) for b in (min(BUDGETS), max(BUDGETS))]
    shares = [cost_ratio(c, dims, n_vision=task["n_vision"], n_text=DEFAULT_TEXT_TOKENS) for c in ends]
    return ",".join(f"{s:.3f}" for s in shares)


def models(dims: LMDims, task: dict[str, int]) -> dict[str, tuple[Any, str | None]]:
    """name -> (the p-MoD config it trains with, its --budget-range)."""
    budget_range = default_range(dims, task)
    rows: dict[str, tuple[Any, str | None]] = {
        "a_default": (FAMILY, None),
        "b_range": (FAMILY, budget_range),
        "b_range_3x": (FAMILY, budget_range),
    }
    for b in BUDGETS:
        rows[f"c_at_{b}"] = rows[f"c3x_at_{b}"] = (scaled(dims, task, b), None)
    rows["dense_3x"] = (None, None)  # the ceiling of the 3x rows: evaluated once, not at a budget
    return rows


def train(run: Path, name: str) -> None:
    dims, task = workload(run)
    config, budget_range = models(dims, task)[name]
    folder = run / "curve" / name
    settings = settings_of(run)
    settings = dataclasses.replace(settings, budget_range=budget_range, steps=settings.steps * LONGER.get(name, 1))
    result = train_config(config, run / "base-model", run / "data", folder, settings)
    print(json.dumps({"name": name, "range": budget_range, "seconds": result["seconds"]}))


def first_batch(run: Path, processor: Any, model: Any, size: int = 32) -> dict[str, Any]:
    """The processor inputs of the eval's first batch, the prompts whose prefill is timed."""
    from pmod.io.model_folder import encode

    records = test_records(run)[:size]
    questions = [question_and_answer(r)[0] for r in records]
    return encode(processor, model, questions, [[record_image(run / "data", r)] for r in records])


def latency_ratio(model: Any, dense: Any, inputs: dict[str, Any]) -> float:
    """``model``'s prefill time of ``inputs`` over dense's: the ratio of minima of ABBA-alternated timings."""

    def prefill(m: Any) -> Any:
        def run() -> dict[str, float]:
            with torch.inference_mode():
                return {"seconds": common.timed(lambda: m(**inputs), "cpu")[0]}

        return run

    samples = common.alternate({"model": prefill(model), "dense": prefill(dense)}, WARMUP, REPS)
    return round(min(s["seconds"] for s in samples["model"]) / min(s["seconds"] for s in samples["dense"]), 3)


def score(model: Any, processor: Any, run: Path, dense: dict[str, Any]) -> dict[str, Any]:
    """Accuracy of ``model`` on the run's held-out questions and its cost as shares of dense's (``dense``: the
    dense model's :func:`evaluate_model` result, its loaded ``model`` and the timed ``inputs``)."""
    result = evaluate_model(model, processor, run / "data", test_records(run))
    return {"accuracy": result["accuracy"], "per_question_kind": result["per_question_kind"],
            "tflops_ratio": round(result["prefill_tflops"] / dense["prefill_tflops"], 4),
            "kv_ratio": round(result["kv_bytes"] / dense["kv_bytes"], 4),
            "latency_ratio": latency_ratio(model, dense["model"], dense["inputs"]),
            "layer_ratios": result["layer_ratios"]}  # fmt: skip


def evaluate(run: Path) -> dict[str, Any]:
    """Every row at every budget into ``RUN/curve/budget_curve.json``, written after each row; rows already there
    (for the same budgets, prompt and FAMILY) are kept, so a killed or extended run evaluates only what is missing."""
    model, processor = load_variant(run / "dense")
    dense = evaluate_model(model, processor, run / "data", test_records(run))  # its tokens: the first question's
    dense.update(model=model, inputs=first_batch(run, processor, model))
    dims, task = LMDims.from_config(model.config), {"n_vision": dense["n_vision"], "n_text": dense["n_text"]}
    out: dict[str, Any] = {"workload": task, "budgets": list(BUDGETS), "range": default_range(dims, task),
                           "family": FAMILY.to_dict(), "dense": {"accuracy": dense["accuracy"]}, "rows": {},
                           "threads": torch.get_num_threads()}  # fmt: skip
    path = run / "curve" / "budget_curve.json"
    if path.exists():
        before = json.loads(path.read_text())
        if all(before.get(k) == out[k] for k in ("workload", "budgets", "range", "family")):
            out["rows"] = before["rows"]
            out.update({k: before[k] for k in ("dense_3x",) if k in before})
    trained = {name: run / "curve" / name for name in models(dims, task) if name != "dense_3x"}
    if "dense_3x" not in out and (run / "curve" / "dense_3x").exists():
        model, processor = load_variant(run / "curve" / "dense_3x")
        out["dense_3x"] = {"accuracy": evaluate_model(model, processor, run / "data", test_records(run))["accuracy"]}
    for name in [*trained, "fastv", "untrained_pmod"]:
        if len(out["rows"].get(name, {})) < len(BUDGETS):
            out["rows"][name] = {
                str(b): evaluate_at(run, trained.get(name, run / "dense"), name, b, dense) for b in BUDGETS
            }
            path.write_text(json.dumps(out, indent=1))
    path.write_text(json.dumps(out, indent=1))  # also when only dense_3x is new
    lines = {name: {b: [cell] for b, cell in cells.items()} for name, cells in curves(out).items()}
    dense_3x = [out["dense_3x"]["accuracy"]] if "dense_3x" in out else None
    plot(lines, [out["dense"]["accuracy"]], run / "curve" / "accuracy_vs_cost.png", dense_3x)
    return out


def evaluate_at(run: Path, folder: Path, name: str, budget: float, dense: dict[str, Any]) -> dict[str, Any]:
    """Row ``name`` (loaded from ``folder``) moved to ``budget`` and :func:`score`d, or why it cannot go there."""
    model, processor = load_variant(folder)
    dims, task = LMDims.from_config(model.config), {"n_vision": dense["n_vision"], "n_text": dense["n_text"]}
    try:  # FastV keeps layers 0-1 whole and cannot go as low as p-MoD
        if name == "fastv":
            pmod.convert(model, at_budget(pmod.FastVConfig(), dims, budget, **task))
        elif name == "untrained_pmod":
            pmod.convert(model, scaled(dims, task, budget))
        else:
            pmod.set_budget(model, budget, **task)
    except ValueError as err:
        return {"unreachable": str(err)}
    cell = score(model, processor, run, dense)
    print(name, budget, {k: v for k, v in cell.items() if k != "layer_ratios"}, flush=True)
    return cell


def curves(result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The issue's curves, as budget -> cell: (a) and (b) at every budget, (c) each model at the budget it was
    trained at, FastV and untrained p-MoD; budgets a model cannot reach, and rows not evaluated, are left out."""
    rows = result["rows"]
    cells = {key: rows[key] for key in CURVES if key in rows}
    for key in ("c", "c3x"):  # one model per budget, each at its own
        if all(f"{key}_at_{b}" in rows for b in result["budgets"]):
            cells[key] = {b: rows[f"{key}_at_{b}"][b] for b in map(str, result["budgets"])}
    return {CURVES[key]: {b: c for b, c in cells[key].items() if "accuracy" in c} for key in CURVES if key in cells}


def summarize(out: Path, runs: list[Path]) -> dict[str, Any]:
    """Every run's curves together: per curve (those every run has) and budget (those every run reaches) the mean
    of each measure over the runs and the accuracy's sd, and the :data:`GAPS` in points (``gaps_points``);
    writes OUT/summary.json and the plot."""
    import numpy as np

    results = {str(run): json.loads((run / "curve" / "budget_curve.json").read_text()) for run in runs}
    per_run = [curves(r) for r in results.values()]
    budgets = [str(b) for b in next(iter(results.values()))["budgets"]]
    mean: dict[str, dict[str, Any]] = {}
    for name in [n for n in CURVES.values() if all(n in c for c in per_run)]:
        reached = [b for b in budgets if all(b in c[name] for c in per_run)]
        cells = [c[name][b] for c in per_run for b in reached]
        measures = [m for m in (*PANELS, "accuracy") if cells and all(m in c for c in cells)]
        mean[name] = {"budgets": [float(b) for b in reached]}
        for m in measures:
            values = np.array([[c[name][b][m] for b in reached] for c in per_run])  # runs x budgets
            mean[name][m] = values.mean(0).round(4).tolist()
        acc = np.array([[c[name][b]["accuracy"] for b in reached] for c in per_run])
        mean[name]["sd"] = acc.std(0, ddof=1).round(4).tolist() if len(runs) > 1 else None
    dense = [r["dense"]["accuracy"] for r in results.values()]
    summary = {"runs": results, "mean": mean, "dense": dense, "gaps_points": {}}
    if all("dense_3x" in r for r in results.values()):  # dense trained as long as the 3x rows
        summary["dense_3x"] = [r["dense_3x"]["accuracy"] for r in results.values()]
    for b_key, c_key in [(b, c) for b, c in GAPS if CURVES[b] in mean and CURVES[c] in mean]:
        b_name, c_name = CURVES[b_key], CURVES[c_key]
        gap = np.array([[c[b_name][b]["accuracy"] - c[c_name][b]["accuracy"] for b in budgets] for c in per_run])
        sd = (100 * gap.std(0, ddof=1)).round(1).tolist() if len(runs) > 1 else None
        points = {"mean": (100 * gap.mean(0)).round(1).tolist(), "sd": sd}
        summary["gaps_points"][f"{b_name} - {c_name}"] = {"budgets": [float(b) for b in budgets], **points}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = {name: {b: [c[name][b] for c in per_run] for b in map(str, mean[name]["budgets"])} for name in mean}
    plot(lines, dense, out / "accuracy_vs_cost.png", summary.get("dense_3x"))
    return summary


#: The plot's panels: a cell's cost measure and its axis label.
PANELS = {
    "tflops_ratio": "prefill TFLOPs, % of dense (analytic)",
    "kv_ratio": "KV cache, % of dense (analytic)",
    "latency_ratio": "prefill latency, % of dense (measured, CPU)",
}


def plot(
    lines: dict[str, dict[str, list[dict[str, Any]]]],
    dense: list[float],
    path: Path,
    dense_3x: list[float] | None = None,
) -> None:
    """Accuracy against each cost of :data:`PANELS`: per curve and budget the mean over the runs' cells (the
    accuracy's sd as error bars when there are several), dense (and ``dense_3x``, trained 3x as long) as points at
    100%."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [m for m in PANELS if all(m in cell for cells in lines.values() for b in cells for cell in cells[b])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, measure in zip(axes[0], panels):
        for name, cells in lines.items():
            xs = [100 * np.mean([c[measure] for c in cells[b]]) for b in cells]
            ys = [np.mean([c["accuracy"] for c in cells[b]]) for b in cells]
            err = [np.std([c["accuracy"] for c in cells[b]], ddof=1) for b in cells] if len(dense) > 1 else None
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
        ax.scatter([100], [np.mean(dense)], color="black", label="dense", zorder=5)
        if dense_3x:
            ax.scatter([100], [np.mean(dense_3x)], color="black", marker="x", label="dense, 3x the steps", zorder=5)
        ax.set_xlabel(PANELS[measure])
    axes[0][0].set_ylabel(f"accuracy, mean of {len(dense)} seed(s)" if len(dense) > 1 else "accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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
