"""DART (Wen et al., 2025, "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More"; github.com/xqy1111111/DART): keep the vision tokens least duplicated with a few pivot tokens.

At layer K, per row: the pivots are the ``pivots`` vision tokens and the ``text_pivots`` text tokens after the last
vision token with the largest L1 norm of their layer K-1 keys (after RoPE, all KV heads); then, pivot by pivot in
position order, each takes the ``ceil((budget - vision pivots) / pivots)`` vision tokens still free that are least
similar (cosine, on the layer K input under the model's final norm) to it. The vision pivots and these tokens, in
that order and cut at the budget ``round(n_vision * keep)``, are kept for every layer >= K; the rest pass those
layers unchanged and leave no K/V there. Layers before K are dense; kept tokens keep their original positions. No
attention scores are needed, so every attention backend works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.core.routed_layer import RoutingRule


@dataclass(frozen=True)
class PivotLayerPlan(LayerPlan):
    """A :class:`LayerPlan` with DART's ranking work, for the analytic cost (``pmod.analysis.analytic_flops``).

    Attributes:
        key_projection: the layer also projects every token to keys (the key norms of layer K-1).
        similarity_rows: rows of a ``[rows, hidden] @ [hidden, T]`` similarity against every token (layer K).
    """

    key_projection: bool = False
    similarity_rows: int = 0


@register_method
@dataclass
class DARTConfig(MethodConfig):
    """Settings of DART.

    Attributes:
        layer: K, the first pruned layer (the pivots come from layer K-1's keys); at least 1.
        keep: share of each row's vision tokens kept from layer K on (the paper's 128 of 576: 0.222).
        pivots: vision pivot tokens per row (kept).
        text_pivots: text pivot tokens per row, from the text after the image.
    """

    method: ClassVar[str] = "dart"
    display_name: ClassVar[str] = "DART"
    paper: ClassVar[str] = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters "\
        "More (DART, 2025)"  # fmt: skip
    listing_order: ClassVar[int] = 5
    trainable: ClassVar[bool] = False

    layer: int = field(default=2, metadata={"help": "K: layers >= K keep only the least duplicated vision tokens"})
    keep: float = field(default=0.222, metadata={"help": "share of vision tokens kept from layer K on"})
    pivots: int = field(default=4, metadata={"help": "vision pivot tokens per row (largest key L1 norm)"})
    text_pivots: int = field(default=4, metadata={"help": "text pivot tokens per row, after the image"})

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"DART layer K={self.layer} must be >= 1: the pivots come from layer K-1's keys.")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"DART keep {self.keep} is outside (0, 1]; choose the share of vision tokens to keep.")
        if self.pivots < 1 or self.text_pivots < 0:
            raise ValueError(f"DART needs pivots >= 1 and text_pivots >= 0, got {self.pivots} and {self.text_pivots}.")

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("keep", 1e-6, 1.0)

    def describe(self, num_layers: int) -> str:
        return f"DART K={self.layer} keep {self.keep}, {self.pivots} vision + {self.text_pivots} text pivots"

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        if self.layer >= num_layers:
            raise ValueError(f"DART layer K={self.layer} is beyond the model's {num_layers} layers.")
        ratios = [None] * self.layer + [self.keep] * (num_layers - self.layer)
        return schedules.validate_schedule(ratios, num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        plans: list[LayerPlan] = [
            LayerPlan() if r is None else LayerPlan(ratio=r, rounding="round") for r in self.layer_ratios(num_layers)
        ]
        plans[self.layer - 1] = PivotLayerPlan(key_projection=True)
        rows = self.pivots + self.text_pivots
        plans[self.layer] = PivotLayerPlan(ratio=self.keep, rounding="round", similarity_rows=rows)
        return plans

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, RoutingRule]:
        from pmod.methods.dart_rules import DARTKeyRule, DARTPruneRule  # torch: only when a model is built

        ratios = self.layer_ratios(len(layers))
        norm = getattr(decoder, "norm", None)
        if norm is None:
            raise TypeError(f"DART compares hidden states under the decoder's final norm; {type(decoder).__name__} "
                            "has no .norm")  # fmt: skip
        rules: dict[int, RoutingRule] = {self.layer - 1: DARTKeyRule()}
        for i, r in enumerate(ratios):
            if r is not None:
                rules[i] = DARTPruneRule(r, norm, self.pivots, self.text_pivots, first=i == self.layer)
        return rules
