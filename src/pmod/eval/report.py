"""``report.json`` / ``report.md`` of ``pmod eval``: per task and model the task's own metric next to the cost of
the same requests (prefill TFLOPs, KV bytes after prefill, prefill latency, decode speed), the ratios against the
first model (the dense reference), and the metric's difference from it with a paired bootstrap confidence
interval over the documents both were scored on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pmod.core.files import atomic_write_text

#: Fewer timings (batches) than this per model and a latency ratio gets a warning instead of a spread to trust.
MIN_TIMINGS = 5
#: Bootstrap resamples and the confidence level of the intervals.
BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def paired_bootstrap(
    scores: Sequence[Any], reference: Sequence[Any], aggregate: Callable[[list[Any]], float] = mean,
    samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """(observed difference, low, high): ``aggregate(scores) - aggregate(reference)`` and its percentile interval
    when the documents (pairs) are resampled with replacement."""
    import numpy as np

    if len(scores) != len(reference) or not scores:
        raise ValueError(f"need the same non-zero number of paired scores, got {len(scores)} and {len(reference)}")
    observed = aggregate(list(scores)) - aggregate(list(reference))
    rng = np.random.default_rng(seed)
    n = len(scores)
    numeric = all(isinstance(v, int | float) for v in [*scores, *reference]) and aggregate is mean
    if numeric:  # vectorised: the same resamples, without a Python loop over them
        diff = np.asarray(scores, dtype=float) - np.asarray(reference, dtype=float)
        deltas = diff[rng.integers(0, n, size=(samples, n))].mean(axis=1)
    else:
        deltas = []
        for _ in range(samples):
            idx = rng.integers(0, n, size=n)
            deltas.append(aggregate([scores[i] for i in idx]) - aggregate([reference[i] for i in idx]))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return float(observed), float(low), float(high)


def primary_metric(result: dict[str, Any], task: str) -> tuple[str, str, float] | None:
    """(task entry, metric, value) of the task's own first metric in lmms-eval's results (a group's first
    subtask when the task is a group without a score of its own)."""
    entries = result["results"]
    for name in [task, *entries]:
        for key, value in entries.get(name, {}).items():
            metric, _, _filter = key.partition(",")
            if _filter and "_stderr" not in metric and isinstance(value, int | float):
                return name, metric, float(value)
    return None


def aggregation(manager: Any, task: str, metric: str) -> Callable[[list[Any]], float]:
    """The task's own aggregation of ``metric`` (from its YAML), for per-sample scores that are not plain numbers
    (MME and POPE keep a record per document); ``mean`` when none is found."""
    try:
        from lmms_eval.api.registry import get_aggregation
        from lmms_eval.utils import load_yaml_config

        config = load_yaml_config(manager.task_index[task]["yaml_path"], mode="full")
        for entry in config.get("metric_list", []):
            if entry.get("metric") == metric:
                agg = entry.get("aggregation", "mean")
                return agg if callable(agg) else get_aggregation(agg)
    except Exception:  # a group, a Python task: fall back to the mean
        pass
    return mean


def read_scores(task_dir: Path, task: str, metric: str) -> dict[Any, Any]:
    """doc id -> per-sample score of ``metric`` from ``samples.jsonl``."""
    scores = {}
    path = task_dir / "samples.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        sample = json.loads(line)
        if sample.get("task") == task and metric in sample:
            scores[sample["doc_id"]] = sample[metric]
    return scores


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def write_report(
    out: Path, specs: Sequence[Any], tasks: Sequence[str], folders: dict[tuple[str, str], Path], manager: Any = None
) -> dict[str, Any]:
    """Build the report from the finished result folders (``folders``: (model label, task) -> its folder under
    ``out``) and write report.json and report.md."""
    report: dict[str, Any] = {
        "reference": specs[0].label, "models": {s.label: s.folder for s in specs},
        "model_args": {s.label: s.args for s in specs}, "tasks": {},
    }  # fmt: skip
    for task in tasks:
        rows, ref = [], None
        for spec in specs:
            folder = folders[spec.label, task]
            path = folder / "result.json"
            if not path.is_file():
                continue
            result = json.loads(path.read_text())
            found = primary_metric(result, task)
            if found is None:
                continue
            entry, metric, value = found
            cost = result["cost"].get(entry) or next(iter(result["cost"].values()), {})
            row = {"model": spec.label, "result": str(folder.relative_to(out)), "entry": entry, "metric": metric,
                   "score": value, "higher_is_better": result["higher_is_better"].get(entry, {}).get(metric),
                   "documents": len(read_scores(folder, entry, metric)), **cost}  # fmt: skip
            if ref is None:
                ref = row
            else:
                row.update(compare(row, ref, out, manager))
            rows.append(row)
        report["tasks"][task] = rows
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
    return report


def compare(row: dict[str, Any], ref: dict[str, Any], out: Path, manager: Any) -> dict:
    """Ratios of ``row``'s cost to the reference's, the latency ratio's spread over documents, and the metric's
    difference with its bootstrap interval."""
    cmp = {
        "tflops_ratio": _ratio(row.get("prefill_tflops"), ref.get("prefill_tflops")),
        "kv_ratio": _ratio(row.get("kv_bytes"), ref.get("kv_bytes")),
        "latency_ratio": _ratio(row.get("prefill_ms_per_request"), ref.get("prefill_ms_per_request")),
        "delta": row["score"] - ref["score"],
        **latency_comparison(out / row["result"], out / ref["result"], row["entry"]),
    }
    if row["entry"] != ref["entry"] or row["metric"] != ref["metric"]:
        return cmp
    mine = read_scores(out / row["result"], row["entry"], row["metric"])
    theirs = read_scores(out / ref["result"], ref["entry"], ref["metric"])
    shared = sorted(set(mine) & set(theirs), key=str)
    if shared:
        agg = aggregation(manager, row["entry"], row["metric"]) if manager is not None else mean
        delta, low, high = paired_bootstrap([mine[d] for d in shared], [theirs[d] for d in shared], agg)
        cmp.update(delta=delta, ci_low=low, ci_high=high, paired_documents=len(shared))
    return cmp


def latency_comparison(folder: Path, ref_folder: Path, entry: str) -> dict[str, Any]:
    """The prefill latency against the reference document by document: the median of the per-document ratios
    (``latency_ratio``, replacing the ratio of the medians), their :func:`~pmod.eval.cost.spread`
    (``latency_ratio_spread``), the number of timings behind them (batches, the fewer of the two models'), and a
    ``latency_warning`` when the timings cannot tell the models apart: fewer than :data:`MIN_TIMINGS`, or the
    middle half of the per-document ratios reaching both sides of 1.0 (the noise is larger than the effect)."""
    from pmod.eval.cost import per_document_ms, read_costs, spread

    mine_records, ref_records = read_costs(folder / "costs"), read_costs(ref_folder / "costs")
    mine, theirs = per_document_ms(mine_records), per_document_ms(ref_records)
    ratios = [mine[k] / theirs[k] for k in sorted(set(mine) & set(theirs), key=str) if k[0] == entry and theirs[k]]
    if not ratios:
        return {}
    timings = min(len({r["batch"] for r in records if r["task"] == entry}) for records in (mine_records, ref_records))
    s = spread(ratios)
    warning = None
    if timings < MIN_TIMINGS:
        warning = (f"the prefill latency ratio rests on {timings} timing(s) per model, too few to tell noise from "
                   f"effect; evaluate more documents (--limit) or pass a smaller --batch-size.")  # fmt: skip
    elif s["q1"] <= 1.0 <= s["q3"]:
        warning = (f"the middle half of the per-document prefill latency ratios ({s['q1']:.3g}x to {s['q3']:.3g}x "
                   f"over {s['n']} documents) covers 1.0: the timing noise is larger than the difference; do not "
                   f"quote this ratio, measure on an idle machine (a GPU) or with more documents.")  # fmt: skip
    return {"latency_ratio": s["median"], "latency_ratio_spread": s, "latency_timings": timings,
            "latency_warning": warning}  # fmt: skip


def _fmt(value: Any, spec: str = ".4g", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _range(center: Any, spread: dict[str, Any] | None, spec: str) -> str:
    """``center [q1, q3]`` (the middle half of the values), or ``center`` alone without a spread."""
    if center is None or not spread:
        return _fmt(center, spec)
    return f"{center:{spec}} [{spread['q1']:{spec}}, {spread['q3']:{spec}}]"


def markdown(report: dict[str, Any]) -> str:
    level = int(CONFIDENCE * 100)
    lines = [
        "# pmod eval", "",
        f"Reference (ratios and differences against it): **{report['reference']}**. Cost of the same requests: "
        "prefill TFLOPs summed over them (analytic, `pmod flops` with the LM head on every prefill token), KV "
        "cache after prefill summed over them (measured), median prefill latency per request (a batch's time "
        "shared by its rows) with the quartiles over batches in brackets, its ratio to the reference as the median "
        "of the per-document ratios with their quartiles, and decode speed; each metric's difference from the "
        f"reference comes with a paired bootstrap {level}% interval over the documents both models were scored on.",
        "", *(f"- {label}: {folder} {_args(report.get('model_args', {}).get(label))}".rstrip()
              for label, folder in report["models"].items()), "",
    ]  # fmt: skip
    for task, rows in report["tasks"].items():
        if not rows:
            continue
        metric = rows[0]["metric"]
        lines += [f"## {task} ({metric})", "",
                  f"| model | {metric} | diff [{level}% CI] | docs | TFLOPs | ratio | KV MiB | ratio | prefill ms/req "
                  "| ratio | decode tok/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            diff = "reference"
            if "delta" in r:
                diff = f"{r['delta']:+.4f}"
                if "ci_low" in r:
                    diff += f" [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
            kv = r.get("kv_bytes")
            lines.append(
                f"| {r['model']} | {r['score']:.4f} | {diff} | {r['documents']} | {_fmt(r.get('prefill_tflops'))} "
                f"| {_fmt(r.get('tflops_ratio'), '.1%')} | {_fmt(kv / 2**20 if kv else None)} "
                f"| {_fmt(r.get('kv_ratio'), '.1%')} "
                f"| {_range(r.get('prefill_ms_per_request'), r.get('prefill_ms_spread'), '.2f')} "
                f"| {_range(r.get('latency_ratio'), r.get('latency_ratio_spread'), '.1%')} "
                f"| {_fmt(r.get('decode_tokens_per_s'), '.1f')} |"
            )
        lines.append("")
        lines += [f"**Warning** ({r['model']}): {r['latency_warning']}\n" for r in rows if r.get("latency_warning")]
    return "\n".join(lines)


def _args(args: dict[str, Any] | None) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")" if args else ""
