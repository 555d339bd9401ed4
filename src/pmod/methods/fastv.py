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
from typing import ClassVar

import torch
from torch import nn

from pmod.core import schedules
from pmod.core.compaction import gather_tokens, top_k_mask
from pmod.core.config import LayerPlan, MethodConfig, register_method
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule
from pmod.methods.arank import rotary

SCORES = "fastv_scores"
KEPT = "fastv_kept"


@register_method
@dataclass
class FastVConfig(MethodConfig):
    """Settings of FastV.

    Attributes:
        layer: K, the first pruned layer (ranked by the attention of layer K-1); at least 1.
        keep: share of each row's vision tokens kept from layer K on.
    """

    method: ClassVar[str] = "fastv"
    display_name: ClassVar[str] = "FastV"
    paper: ClassVar[str] = "An Image is Worth 1/2 Tokens After Layer 2 (FastV, ECCV 2024)"
    listing_order: ClassVar[int] = 3
    trainable: ClassVar[bool] = False

    layer: int = field(default=2, metadata={"help": "K: layers >= K keep only the top vision tokens"})
    keep: float = field(default=0.5, metadata={"help": "share of vision tokens kept from layer K on"})

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ValueError(f"FastV layer K={self.layer} must be >= 1: the ranking comes from layer K-1.")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"FastV keep {self.keep} is outside (0, 1]; choose the share of vision tokens to keep.")

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
        ratios = self.layer_ratios(len(layers))
        rules: dict[int, RoutingRule] = {self.layer - 1: FastVScoreRule()}
        rules.update({i: FastVPruneRule(r) for i, r in enumerate(ratios) if r is not None})
        return rules


def last_token_attention(
    layer: nn.Module, hidden: torch.Tensor, real: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Softmax attention [B, T] that each row's last real token pays every token in ``layer``, mean over heads.

    Costs one key projection over the sequence, one query projection and one score row per row.
    """
    attn = layer.self_attn
    bsz, seq = real.shape
    positions = torch.arange(seq, device=real.device).expand(bsz, seq)
    last = positions.masked_fill(~real, -1).max(dim=1).values  # [B]
    normed = layer.input_layernorm(hidden)
    at_last = last.view(bsz, 1)
    cos, sin = (t.expand(bsz, *t.shape[1:]) for t in position_embeddings)
    q = attn.q_proj(gather_tokens(normed, at_last)).view(bsz, 1, -1, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
    k = attn.k_proj(normed).view(bsz, seq, -1, attn.head_dim).transpose(1, 2)  # [B, KV, T, d]
    apply = rotary(attn)
    q = apply(q, q, gather_tokens(cos, at_last), gather_tokens(sin, at_last))[0]
    k = apply(k, k, cos, sin)[1].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, T]
    visible = real & (positions <= last[:, None])
    probs = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
    return probs.mean(dim=1)


class FastVScoreRule(RoutingRule):
    """Layer K-1: runs densely and leaves the last-token attention row for the pruned layers."""

    def route(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if inputs.vision_mask is not None:
            real = inputs.token_mask
            if real is None:
                real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            with torch.no_grad():
                inputs.shared[SCORES] = last_token_attention(layer, hidden, real, position_embeddings)
            inputs.shared.pop(KEPT, None)
        return None


class FastVPruneRule(RoutingRule):
    """Layers >= K: the same kept vision tokens in every layer, chosen once per forward."""

    def __init__(self, keep: float) -> None:
        self.ratio = float(keep)

    def route(
        self, layer: nn.Module, hidden: torch.Tensor, inputs: RoutingInputs, position_embeddings: object = None
    ) -> RouteDecision | None:
        vision = inputs.vision_mask
        if vision is None:
            return None  # text only (decode steps): every token, against the pruned cache
        scores = inputs.shared.get(SCORES)
        if scores is None:
            raise RuntimeError("FastV's ranking is missing: layer K-1 did not run in this forward.")
        kept = inputs.shared.get(KEPT)
        if kept is None:
            if inputs.token_mask is not None:
                vision = vision & inputs.token_mask
            counts = torch.round(vision.sum(dim=1).double() * self.ratio).long()
            kept = inputs.shared[KEPT] = top_k_mask(scores, vision, counts)
        return RouteDecision(processed=~vision | kept, weights=scores)
