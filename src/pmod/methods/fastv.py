"""FastV (Chen et al., ECCV 2024): training-free pruning of vision tokens by the attention the last token pays them.

At layer K, each row's vision tokens are ranked by the attention its LAST real token pays them in layer K-1,
averaged over heads; the top ``round(n_vision * keep)`` are kept for every layer >= K and the rest dropped (they
pass those layers unchanged, and their K/V are never cached). Layers before K are dense. Kept tokens keep their
original positions.

The attention row is computed here from layer K-1's own q/k projections and RoPE (one extra key projection over
the sequence), so any attention backend works, sdpa included; no eager attention or ``output_attentions``.
Rows of a batch are ranked on their own (the original code ranks row 0 and applies it to the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.core.routed_layer import RoutingRule


#: FastV's rankings: its own, and the random control.
RANKINGS: tuple[str, ...] = ("attention", "random")


@register_method
@dataclass
class FastVConfig(MethodConfig):
    """Settings of FastV.

    Attributes:
        layer: K, the first pruned layer (ranked by the attention of layer K-1); at least 1.
        keep: share of each row's vision tokens kept from layer K on.
        ranking: ``attention`` (FastV's rule) or ``random``: the same number of tokens drawn at random in every
            forward (a control, not FastV: what a ranking is worth against none; seeded by ``seed``).
        seed: the random ranking's seed.
    """

    method: ClassVar[str] = "fastv"
    display_name: ClassVar[str] = "FastV"
    paper: ClassVar[str] = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV 2024)"
    listing_order: ClassVar[int] = 3
    trainable: ClassVar[bool] = False

    layer: int = field(default=2, metadata={"help": "K: layers >= K keep only the top vision tokens"})
    keep: float = field(default=0.5, metadata={"help": "share of vision tokens kept from layer K on"})
    ranking: str = field(default="attention", metadata={
        "help": "attention (FastV) or random (a control: as many tokens drawn at random)"})  # fmt: skip
    seed: int = field(default=0, metadata={"help": "seed of ranking=random"})

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV layer K={self.layer} must be >= 1: the ranking comes from layer K-1.")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"FastV keep {self.keep} is outside (0, 1]; choose the share of vision tokens to keep.")
        if self.ranking not in RANKINGS:
            raise ValueError(f"FastV ranking {self.ranking!r} is unknown; choose one of {', '.join(RANKINGS)}.")

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("keep", 1e-6, 1.0)

    def describe(self, num_layers: int) -> str:
        ranking = "" if self.ranking == "attention" else f", {self.ranking} ranking (a control)"
        return f"FastV K={self.layer} keep {self.keep}{ranking}"

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        if self.layer >= num_layers:
            raise ValueError(f"FastV layer K={self.layer} is beyond the model's {num_layers} layers.")
        ratios = [None] * self.layer + [self.keep] * (num_layers - self.layer)
        return schedules.validate_schedule(ratios, num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        plans = [
            LayerPlan() if r is None else LayerPlan(ratio=r, rounding="round") for r in self.layer_ratios(num_layers)
        ]
        plans[self.layer - 1] = LayerPlan(scores_last_token=True)
        return plans

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, RoutingRule]:
        from pmod.methods.fastv_rules import FastVPruneRule, FastVScoreRule  # torch: only when a model is built

        ratios = self.layer_ratios(len(layers))
        random_seed = self.seed if self.ranking == "random" else None
        rules: dict[int, RoutingRule] = {self.layer - 1: FastVScoreRule(random_seed)}
        rules.update({i: FastVPruneRule(r) for i, r in enumerate(ratios) if r is not None})
        return rules
