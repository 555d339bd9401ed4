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
from pmod.analysis.dims import vision_tokens
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

    return with_value(_solve(cost, low, high, budget, f"{config.method} reaches {measure} shares", iterations))


def _solve(cost: Any, low: float, high: float, budget: float, reaches: str, iterations: int = 60) -> float:
    """The value in [low, high] whose ``cost`` (monotone, rising or falling) comes closest to ``budget``, written
    with the fewest digits that keep its cost; ValueError ``"{reaches} a to b ..."`` when out of reach."""
    cheap, dear = (low, high) if cost(low) <= cost(high) else (high, low)
    reach = (cost(cheap), cost(dear))
    if not reach[0] - 1e-12 <= budget <= reach[1] + 1e-12:
        raise ValueError(f"{reaches} {reach[0]:.4f} to {reach[1]:.4f} of dense's here, not {budget}; choose a "
                         f"budget in that range")  # fmt: skip
    for _ in range(iterations):  # cost(cheap) <= budget <= cost(dear) throughout
        middle = (cheap + dear) / 2
        cheap, dear = (middle, dear) if cost(middle) <= budget else (cheap, middle)
    best = min((cheap, dear), key=lambda v: (abs(cost(v) - budget), cost(v)))
    # Bisection ends on the edge of a step of the cost: give that value rounded to the fewest significant digits
    # that keep its cost instead, which reads well and survives being printed and typed back in.
    shortest = (float(f"{best:.{digits}g}") for digits in range(2, 18))
    return next(v for v in shortest if low <= v <= high and cost(v) == cost(best))


def set_budget(
    model: Any, budget: float, *, measure: str = "tflops", n_vision: int, n_text: int = DEFAULT_TEXT_TOKENS,
    **workload: Any,
) -> MethodConfig:
    """Run a converted model at another budget, in place; returns the method config it now runs (also stored in its
    config, so ``save_pretrained`` keeps it).

    A method with trained routers keeps its routed layers and their routers: every routed layer's share is scaled
    by one factor, chosen so that the analytic cost (:func:`cost_ratio`, for prompts of ``n_vision`` vision and
    ``n_text`` text tokens) comes closest to ``budget`` (MoD's and gamma-MoD's single ratio move as their knob does;
    p-MoD's schedule becomes the explicit list of the scaled ratios, since moving PRD's ``beta`` would route layers
    that have no router). A training-free method takes :func:`at_budget`'s setting. Raises ValueError for a dense
    model, a method acting before the decoder, or a budget out of reach (naming the reachable range)."""
    from pmod.core.backbone import backbone_for
    from pmod.core.config import store_method_config
    from pmod.core.convert import get_method_config, layer_ratios, routed_layers

    current = get_method_config(model)
    routed = routed_layers(model)
    if current is None or not routed:
        raise ValueError("this model routes no decoder layer, so it has no budget to set; convert it with a method "
                         "first, e.g. pmod.convert(model, pmod.FastVConfig())")  # fmt: skip
    workload = {"n_vision": n_vision, "n_text": n_text, **workload}
    ratios, layers = layer_ratios(model), backbone_for(model).decoder_layers(model)
    chosen = budget_config(current, ratios, LMDims.from_config(model.config), budget, measure, workload)
    if current.trainable:
        set_routed_ratios(routed, chosen.layer_ratios(len(layers)))
    else:
        rules = chosen.build(backbone_for(model).decoder(model), layers)
        if sorted(rules) != sorted(routed):
            raise ValueError(f"{chosen.describe(len(layers))} routes other layers than the model; convert the dense "
                             f"model with it instead")  # fmt: skip
        for i, rule in rules.items():
            routed[i].routing_rule = rule
    store_method_config(model.config, chosen)
    return chosen


def budget_config(
    config: MethodConfig, ratios: list[float | None], dims: Any, budget: float, measure: str, workload: dict
) -> MethodConfig:
    """The config a model running ``config`` with per-layer ``ratios`` (None: a dense layer) runs at ``budget``, as
    :func:`set_budget` moves it: a trained method by :func:`scaled_at_budget`, a training-free one by
    :func:`at_budget`. ValueError naming the reachable range."""
    if config.trainable:
        return scaled_at_budget(config, ratios, dims, budget, measure, workload)
    return at_budget(config, dims, budget, measure=measure, **workload)


def set_routed_ratios(routed: dict[int, Any], ratios: Any) -> None:
    """Each routed layer of ``routed`` (index -> layer) to its share in ``ratios`` (per layer): the rule's ratio
    only, routers and config untouched."""
    for i, layer in routed.items():
        layer.routing_rule.ratio = ratios[i]


def one_image_workload(config: Any, n_text: int = DEFAULT_TEXT_TOKENS) -> dict[str, int] | None:
    """The workload a budget is solved for by default: one image of the model (its ``config.json`` dict) and
    ``n_text`` text tokens (``pmod flops``' default); None for a model without a vision config."""
    per_image = vision_tokens(config)
    return None if per_image is None else {"n_vision": int(per_image[0]), "n_text": n_text}


def scaled_at_budget(
    config: MethodConfig, ratios: list[float | None], dims: Any, budget: float, measure: str, workload: dict
) -> MethodConfig:
    """``config`` (a trained method's) with every routed layer's share of ``ratios`` (per layer, None for a dense
    one) times one factor (each share at most 1), the factor whose cost for ``workload`` comes closest to
    ``budget``: what :func:`set_budget` runs a trained model at. ValueError naming the reachable range."""
    routed = [r for r in ratios if r is not None]

    def scaled(factor: float) -> MethodConfig:
        if config.method == "pmod":
            moved = [None if r is None else min(1.0, r * factor) for r in ratios]
            return dataclasses.replace(config, schedule="explicit", ratios=moved)
        name = config.budget_knob()[0]  # MoD's ratio, gamma-MoD's skip ratio: one share on fixed layers
        share = min(1.0, routed[0] * factor)
        return dataclasses.replace(config, **{name: share if name == "ratio" else 1.0 - share})

    @functools.cache
    def cost(factor: float) -> float:
        return cost_ratio(scaled(factor), dims, measure, **workload)

    factor = _solve(cost, 1e-6, 1.0 / min(routed), budget, f"{config.method} with its routed layers reaches {measure}"
                    f" shares")  # fmt: skip
    return scaled(factor)
