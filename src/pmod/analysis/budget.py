"""One knob for every method: the settings that bring a method's analytic cost to a target share of dense's.

A p-MoD model trained at one budget ranks the vision tokens of every routed layer, so the same model can run at
another budget by changing its schedule; training-free methods take any budget. Each method names the setting
that moves its cost (:meth:`pmod.core.config.MethodConfig.budget_knob`: PRD's ``beta``, MoD's ``ratio``, FastV's,
DART's and PyramidDrop's ``keep``, gamma-MoD's ``skip_ratio``), and :func:`at_budget` finds the value whose
analytic prefill TFLOPs (or KV bytes) come closest to the target, by bisection on the cost (:func:`estimate`, which
rises with each knob; gamma-MoD's falls). Kept counts are whole tokens, so a cost moves in steps and the target is
met to one step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from pmod.analysis.analytic_flops import DEFAULT_TEXT_TOKENS, LMDims, estimate
from pmod.core.config import MethodConfig

#: What a budget is a share of: analytic prefill TFLOPs (LM head included) or KV-cache bytes, each vs dense.
MEASURES = ("tflops", "kv")


def cost_ratio(config: MethodConfig, dims: LMDims | Any, measure: str = "tflops", **workload: Any) -> float:
    """``config``'s analytic cost as a share of dense's: prefill TFLOPs or KV bytes (``measure``), for the
    ``workload`` keywords of :func:`pmod.analysis.analytic_flops.estimate` (``n_vision``, ``n_text``, ...)."""
    report = estimate(dims, config, **workload)
    return report.tflops_ratio if measure == "tflops" else report.kv_cache_ratio


def at_budget(
    config: MethodConfig,
    dims: LMDims | Any,
    budget: float,
    *,
    measure: str = "tflops",
    n_vision: int,
    n_text: int = DEFAULT_TEXT_TOKENS,
    iterations: int = 60,
    **workload: Any,
) -> MethodConfig:
    """``config`` with its budget knob set so that its cost (:func:`cost_ratio`) comes closest to ``budget`` (a
    share of dense's, e.g. 0.4), for prompts of ``n_vision`` vision and ``n_text`` text tokens on a model of
    ``dims`` (or a transformers config). gamma-MoD's layers must be resolved first (``config.resolved(L)``).

    Raises ValueError naming the reachable range when no setting reaches ``budget``, or when the method has no
    knob (p-MoD's explicit schedule)."""
    if measure not in MEASURES:
        raise ValueError(f"budget measure {measure!r} is unknown; choose one of {', '.join(MEASURES)}")
    knob = config.budget_knob()
    if knob is None:
        raise ValueError(f"{config.describe(0)} has no budget setting; choose the schedule's ratios yourself")
    name, low, high = knob
    workload = {"n_vision": n_vision, "n_text": n_text, **workload}

    def with_value(value: float) -> MethodConfig:
        return dataclasses.replace(config, **{name: value})

    @functools.cache  # the bisection's ends and the rounding below ask for the same values again
    def cost(value: float) -> float:
        return cost_ratio(with_value(value), dims, measure, **workload)

    cheap, dear = (low, high) if cost(low) <= cost(high) else (high, low)
    reach = (cost(cheap), cost(dear))
    if not reach[0] - 1e-12 <= budget <= reach[1] + 1e-12:
        raise ValueError(f"{config.method} reaches {measure} shares {reach[0]:.4f} to {reach[1]:.4f} of dense's "
                         f"here, not {budget}; choose a budget in that range")  # fmt: skip
    for _ in range(iterations):  # cost(cheap) <= budget <= cost(dear) throughout
        middle = (cheap + dear) / 2
        cheap, dear = (middle, dear) if cost(middle) <= budget else (cheap, middle)
    best = min((cheap, dear), key=lambda v: (abs(cost(v) - budget), cost(v)))
    # Bisection ends on the edge of a step of the cost: give that value rounded to the fewest significant digits
    # that keep its cost instead, which reads well and survives being printed and typed back in.
    shortest = (float(f"{best:.{digits}g}") for digits in range(2, 18))
    short = next(v for v in shortest if low <= v <= high and cost(v) == cost(best))
    return with_value(short)
