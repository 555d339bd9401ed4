"""`pmod train --budget-range LO,HI`: budget-robust training, so that one trained model serves every budget in
the range (issue 26).

Before each optimizer step (all its micro-batches alike) :class:`BudgetRange` draws a budget, a share of dense's
analytic prefill TFLOPs, uniformly from [LO, HI] and moves the routed layers' ratios to those
:func:`pmod.set_budget` would choose for it: every routed share scaled by one factor (the layers and routers stay
the ones trained). After the step (so before any checkpoint or evaluation) and at the end of training it puts the
trained ratios back, and it never touches the model's config: checkpoints and the final folder hold the trained
budget.

* The draw of step ``k`` is ``numpy.random.default_rng([seed, k]).uniform(LO, HI)`` rounded to 3 decimals (kept
  within [LO, HI]): it depends on the run's ``--seed`` and the step only, so a resumed run draws what an unbroken one
  would, and every process of a distributed run draws the same.
* The budget's workload is one image (the model's vision tokens per image, :func:`pmod.analysis.dims.vision_tokens`)
  and :data:`pmod.analysis.dims.DEFAULT_TEXT_TOKENS` text tokens, the default of ``pmod flops``, so a budget here
  means what it means to ``pmod flops --budget`` and ``pmod.set_budget`` with their default text length.
* Solving a budget's factor takes a bisection over the analytic cost (~30 ms on a 32-layer model); it is solved
  once per rounded budget and cached, so a run solves at most ``1000 (HI - LO) + 1`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn
from transformers import TrainerCallback

from pmod.analysis.budget import one_image_workload, scaled_at_budget, set_routed_ratios
from pmod.analysis.dims import DEFAULT_TEXT_TOKENS, LMDims
from pmod.core.convert import get_method_config, layer_ratios, routed_layers
from pmod.core.errors import UserError

#: Decimals a drawn budget is rounded to (a kept-token step of the cost is coarser on real models).
DECIMALS = 3


def parse_budget_range(value: str | Sequence[float]) -> tuple[float, float]:
    """``"LO,HI"`` (or a recipe file's ``[LO, HI]``) as two floats with ``0 < LO <= HI <= 1``; a one-line
    :class:`~pmod.core.errors.UserError` otherwise."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise UserError(f"--budget-range {value!r}: give two shares of dense's TFLOPs as LO,HI, e.g. 0.3,0.8") from None
    if not (0 < low <= 1 and 0 < high <= 1):
        raise UserError(f"--budget-range {low},{high}: budgets are shares of dense's TFLOPs in (0, 1]")
    if low > high:
        raise UserError(f"--budget-range {low},{high}: LO is above HI; give LO,HI, e.g. {high},{low}")
    return low, high


def draw(seed: int, step: int, low: float, high: float) -> float:
    """The budget of optimizer step ``step`` (counted from 0) of a run with ``seed``."""
    value = float(np.random.default_rng([seed, step]).uniform(low, high))
    return min(high, max(low, round(value, DECIMALS)))


class BudgetRange(TrainerCallback):
    """Runs each optimizer step of a trained routed ``model`` at a budget drawn from [``low``, ``high``] (see the
    module's docstring); refuses (:class:`~pmod.core.errors.UserError`) a model without trained routed layers and a
    range the model cannot reach, naming the reachable one."""

    def __init__(self, model: nn.Module, low: float, high: float, seed: int, n_text: int = DEFAULT_TEXT_TOKENS):
        config = get_method_config(model)
        self.routed = routed_layers(model)
        if config is None or not self.routed or not config.trainable:
            what = "a dense model" if config is None or not self.routed else f"{config.method}, training-free"
            raise UserError(f"--budget-range moves the ratios of trained routed layers, but this run trains {what}; "
                            f"train a routed method (e.g. --method pmod) or drop --budget-range")  # fmt: skip
        workload = one_image_workload(model.config.to_dict(), n_text)
        if workload is None:
            raise UserError("--budget-range: the model has no vision config to count an image's tokens")
        self.config, self.low, self.high, self.seed = config, low, high, seed
        self.trained, self.workload = layer_ratios(model), workload
        self.dims = LMDims.from_config(model.config)
        self.solved: dict[float, tuple[float | None, ...]] = {}
        self.budgets: dict[int, float] = {}  # the budget each step of this process ran at, by step
        for end in (low, high):  # a range out of reach answers before the first step
            self.ratios_at(end)

    def ratios_at(self, budget: float) -> tuple[float | None, ...]:
        """Per-layer ratios (None for a dense layer) that run the trained model at ``budget`` (solved once each)."""
        if budget in self.solved:
            return self.solved[budget]
        try:
            chosen = scaled_at_budget(self.config, self.trained, self.dims, budget, "tflops", self.workload)
        except ValueError as err:
            raise UserError(f"--budget-range {self.low},{self.high}: {err} (for one image of "
                            f"{self.workload['n_vision']} vision and {self.workload['n_text']} text tokens)") from None
        self.solved[budget] = tuple(chosen.layer_ratios(len(self.trained)))
        return self.solved[budget]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        self.budgets[state.global_step] = draw(self.seed, state.global_step, self.low, self.high)
        set_routed_ratios(self.routed, self.ratios_at(self.budgets[state.global_step]))
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        set_routed_ratios(self.routed, self.trained)  # before the Trainer logs, evaluates or saves a checkpoint
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        set_routed_ratios(self.routed, self.trained)
        return control
