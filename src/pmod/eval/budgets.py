"""`pmod eval --budgets 0.3,0.4,...` (issue 26): every routed model (a routed folder, or a dense one with
``method=``) evaluated at every budget, a share of dense's analytic prefill TFLOPs; dense models once.

A budget is the model arg ``budget=`` (``--model DIR,budget=0.4`` alone, or in ``python -m lmms_eval --model pmod
--model_args ...``): the model is loaded (and converted) as usual, then moved there by :func:`pmod.set_budget` (a
trained method keeps its routed layers, every routed share scaled by one factor; a training-free one takes
:func:`pmod.at_budget`'s setting). The workload a budget is solved for is one image (the model's vision tokens per
image, :func:`pmod.analysis.dims.vision_tokens`) and :data:`pmod.analysis.dims.DEFAULT_TEXT_TOKENS` text tokens, as
``pmod train --budget-range`` and ``pmod flops``; the report gives each row's exact share over the requests it
answered. Rows are named ``MODEL@0.40``. :func:`plot_curves` draws the score against that share, and against the
KV cache and the prefill latency the report measured (:data:`CURVES`), one line per model, a model without a budget
as one point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pmod.analysis.budget import budget_config, cost_ratio, one_image_workload, set_budget
from pmod.analysis.dims import DEFAULT_TEXT_TOKENS, LMDims
from pmod.core.config import MethodConfig, stored_method_config
from pmod.core.errors import UserError


def parse_budgets(text: str) -> list[float]:
    """``"0.3,0.4,..."`` as distinct shares in (0, 1], in the order given; a one-line error otherwise."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--budgets {text}: give shares of dense's TFLOPs separated by commas, e.g. 0.3,0.5,0.8") \
            from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise UserError(f"--budgets {text}: each budget is a share of dense's TFLOPs in (0, 1], e.g. 0.3,0.5,0.8")
    return list(dict.fromkeys(values))


def label(budget: float | str) -> str:
    """What a row's name gets for its budget: ``@0.40``."""
    return f"@{float(budget):.2f}"


def workload(config: dict[str, Any], folder: str | Path) -> dict[str, int]:
    """The workload a budget is solved for: one image of the model (its ``config.json`` dict) and the default text."""
    load = one_image_workload(config)
    if load is None:
        raise UserError(f"budget: {folder} has no vision config to count an image's tokens; drop the budget")
    return load


def config_at_budget(config: dict[str, Any], method: MethodConfig | None, budget: float, folder: str) -> MethodConfig:
    """The method config the model of ``folder`` (its ``config.json`` dict; ``method``: the one ``method=`` converts
    a dense folder with) runs at ``budget``, worked out without loading it, as :func:`pmod.set_budget` will; a
    one-line error for a dense model and a budget out of reach (naming the reachable range)."""
    current = stored_method_config(config) or method
    if current is None:
        raise UserError(f"budget={budget}: {folder} is a dense model, with no budget to set; drop the budget or pass "
                        f"a method (DIR,method=fastv,budget={budget})")  # fmt: skip
    dims, load = LMDims.from_config(config), workload(config, folder)
    try:
        return budget_config(current, current.layer_ratios(dims.layers), dims, budget, "tflops", load)
    except ValueError as err:
        raise UserError(f"{folder} at budget {budget}: {err}") from None


def apply_budget(model: Any, budget: float | str, folder: str | Path) -> MethodConfig:
    """Move a loaded (converted) model to ``budget`` in place (:func:`pmod.set_budget`); one-line errors."""
    value = _number(budget)
    try:
        return set_budget(model, value, **workload(model.config.to_dict(), folder))
    except ValueError as err:
        raise UserError(f"{folder} at budget {value}: {err}") from None


def at_budgets(
    spec: Any, config: dict[str, Any], method: MethodConfig | None, budgets: list[float] | None, log: Any
) -> list[Any]:
    """``spec`` once per budget of ``budgets`` (``--budgets``), with ``budget=`` in its args, when it is routed (a
    routed folder, or ``method=``); as it is otherwise, or when it has its own ``budget=``. ``config``/``method``: its
    ``config.json`` dict and ``method=`` config. Every budget is checked (reachable) before anything loads, and the
    setting chosen for it is logged."""
    own = spec.args.get("budget")
    if own is not None and budgets is not None:
        raise UserError(f"--model {spec.folder} has budget= and --budgets is given; drop one of them")
    if own is None and (budgets is None or (stored_method_config(config) is None and method is None)):
        return [spec]
    values = budgets or [_number(own)]
    out = [type(spec)(spec.folder, {**spec.args, "budget": f"{b:g}"}) for b in values]
    for b, budgeted in zip(values, out, strict=True):
        chosen = config_at_budget(config, method, b, spec.folder)
        share = cost_ratio(chosen, LMDims.from_config(config), "tflops", **workload(config, spec.folder))
        log(f"{budgeted.name}: {chosen.describe(LMDims.from_config(config).layers)} ({share:.4f} of dense's TFLOPs "
            f"for one image and {DEFAULT_TEXT_TOKENS} text tokens)")  # fmt: skip
    return out


def _number(budget: Any) -> float:
    try:
        return float(budget)
    except ValueError:
        raise UserError(f"budget={budget} is not a number; give a share of dense's TFLOPs, e.g. budget=0.4") from None


#: What a curve's x axis can be (``measure``), with its file in ``--out`` and its axis label (``{reference}``: the
#: report's reference model, the first one): analytic prefill TFLOPs against dense's for the same requests; the
#: report's measured KV cache after prefill (``kv_ratio``) and prefill latency (``latency_ratio``, the median of the
#: per-document ratios), both against the reference's, which sits at 100%.
CURVES = {
    "tflops": ("accuracy_vs_tflops.png", "analytic prefill TFLOPs (% of dense's)"),
    "kv": ("accuracy_vs_kv.png", "KV cache after prefill, measured (% of {reference}'s)"),
    "latency": ("accuracy_vs_latency.png", "prefill latency, measured (median per-document % of {reference}'s)"),
}


def plot_all(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """Measure -> the file in ``out`` of :func:`plot_curves` for every measure of :data:`CURVES`."""
    return {measure: plot_curves(report, out / CURVES[measure][0], measure) for measure in CURVES}


def plot_curves(report: dict[str, Any], path: Path, measure: str = "tflops") -> Path:
    """:func:`curves_figure` of ``measure`` saved to ``path``."""
    import matplotlib.pyplot as plt

    fig = curves_figure(report, measure)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def curves_figure(report: dict[str, Any], measure: str = "tflops") -> Any:
    """Each task's score against the cost ``measure`` (a key of :data:`CURVES`) of the same requests, one line per
    model over its budgets (:func:`curves`), a model without budgets as one point; one panel per task."""
    import matplotlib.pyplot as plt

    import pmod.analysis.plots  # noqa: F401 - chooses the Agg backend (files only)

    tasks = [(task, rows) for task, rows in report["tasks"].items() if rows]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5.5 * max(len(tasks), 1), 4.2), squeeze=False)
    xlabel = CURVES[measure][1].format(reference=report["reference"])
    for ax, (task, rows) in zip(axes[0], tasks, strict=False):
        for name, points in curves(report, rows, measure).items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, "o-" if len(points) > 1 else "s", label=name, markersize=5)
        ax.set(xlabel=xlabel, ylabel=rows[0]["metric"], title=task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if measure == "latency" and any(r.get("latency_warning") for _, rows in tasks for r in rows):
        fig.suptitle("some latency ratios carry a warning in report.md (too few timings, or noise larger than the "
                     "difference)", fontsize=8)  # fmt: skip
    fig.tight_layout()
    return fig


def curves(report: dict[str, Any], rows: list[dict[str, Any]], measure: str = "tflops") -> dict[str, list[tuple]]:
    """Name -> (cost ``measure`` in % (:data:`CURVES`), score) of each model's rows (``rows``: one task's, the
    reference's first): rows whose folder and args differ only in ``budget`` share a name (the row's without its
    ``@budget``). A row without that cost (a ratio the report could not form) is left out."""
    names: dict[tuple, str] = {}
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        args = dict(report["model_args"].get(row["model"]) or {})
        budget = args.pop("budget", None)
        key = (report["models"][row["model"]], tuple(sorted(args.items())))
        name = names.setdefault(key, row["model"].replace(label(budget), "") if budget is not None else row["model"])
        share = _cost_share(row, row is rows[0], measure)
        if share is not None:
            out.setdefault(name, []).append((100 * share, row["score"]))
    return out


def _cost_share(row: dict[str, Any], reference: bool, measure: str) -> float | None:
    """``row``'s cost ``measure`` as a share: its analytic prefill TFLOPs of dense's, or the report's KV / latency
    ratio to the reference (1 for the reference itself)."""
    if measure == "tflops":
        return row["prefill_tflops"] / row["dense_prefill_tflops"]
    if measure not in CURVES:
        raise ValueError(f"unknown cost measure {measure!r}; choose one of {', '.join(CURVES)}")
    return 1.0 if reference else row.get(f"{measure}_ratio")
