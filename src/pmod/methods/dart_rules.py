"""DART at run time: layer K-1 leaves its keys' L1 norms, layer K picks the pivots and ranks the vision tokens by
how little they duplicate them, layers >= K keep the top of that ranking (settings:
:class:`pmod.methods.dart.DARTConfig`)."""

from __future__ import annotations

import torch
from torch import nn

from pmod.core.compaction import kept_counts
from pmod.core.compat import rotary
from pmod.core.plan import VISION
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule
from pmod.methods.fastv_rules import head_norm

KEY_NORMS = "dart_key_norms"
SCORES = "dart_scores"


def key_l1_norms(layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """L1 norm [B, T] of every token's key in ``layer`` (after the per-head norm where the model has one, as Qwen3's
    k_norm, and RoPE; all KV heads together), float32."""
    attn = layer.self_attn
    bsz, seq = hidden.shape[:2]
    k = attn.k_proj(layer.input_layernorm(hidden)).view(bsz, seq, -1, attn.head_dim)
    k = head_norm(attn, "k_norm", k).transpose(1, 2)
    cos, sin = (t.expand(*t.shape[:-3], bsz, *t.shape[-2:]) for t in position_embeddings)
    k = rotary(attn)(k, k, cos, sin)[1]
    return k.float().abs().sum(dim=(1, 3))


def _top_positions(values: torch.Tensor, allowed: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` positions of the largest ``values`` [B, T] among ``allowed`` per row (ties: lower position
    first), and which of them exist (a row may have fewer): ([B, count], [B, count])."""
    count = min(count, values.shape[1])
    top = values.masked_fill(~allowed, float("-inf")).sort(dim=1, descending=True, stable=True).indices[:, :count]
    exists = torch.arange(count, device=values.device) < allowed.sum(1, keepdim=True)
    return top, exists


def pivot_tokens(norms: torch.Tensor, vision: torch.Tensor, real: torch.Tensor, pivots: int, text_pivots: int):
    """The pivots per row: the vision pivots by key norm, largest first ([B, p], exists [B, p]); all pivots in
    position order ([B, P], exists [B, P]), vision and text (the real non-vision tokens after the last vision token)."""
    positions = torch.arange(norms.shape[1], device=norms.device)
    last_vision = positions.masked_fill(~vision, -1).max(dim=1, keepdim=True).values
    text = real & ~vision & (positions > last_vision)
    image, image_ok = _top_positions(norms, vision, pivots)
    words, words_ok = _top_positions(norms, text, text_pivots)
    both, ok = torch.cat([image, words], dim=1), torch.cat([image_ok, words_ok], dim=1)
    # Position order; missing pivots after the real ones (+T, then the remainder takes it off again).
    order = (both + torch.where(ok, 0, norms.shape[1])).sort(dim=1)
    return image, image_ok, order.values.remainder(norms.shape[1]), ok.gather(1, order.indices)


def duplication_ranking(
    states: torch.Tensor, norms: torch.Tensor, vision: torch.Tensor, real: torch.Tensor, keep: float, counts: tuple
) -> torch.Tensor:
    """DART's ranking [B, T] (higher kept first): the vision pivots, then each pivot's least similar free vision
    tokens in turn; -inf on the rest. ``counts`` = (vision pivots, text pivots)."""
    bsz, seq = vision.shape
    device = states.device
    image, image_ok, pivots, pivot_ok = pivot_tokens(norms, vision, real, *counts)
    unit = nn.functional.normalize(states.float(), dim=-1)
    at = unit.gather(1, pivots[..., None].expand(-1, -1, unit.shape[-1]))
    similarity = at @ unit.transpose(1, 2)  # [B, P, T]: the one matmul of the ranking
    order = torch.full((bsz, seq), float("inf"), device=device)
    first = torch.arange(image.shape[1], device=device, dtype=order.dtype).expand_as(image)
    order.scatter_(1, image, torch.where(image_ok, first, float("inf")))
    taken = image_ok.sum(1)
    budget = kept_counts(vision.sum(1), keep, "round")  # the plan's round(n_vision * keep)
    # ceil((budget - vision pivots) / pivots), as a negated floor division
    per_pivot = (taken - budget).clamp(max=0).div(pivot_ok.sum(1).clamp(min=1), rounding_mode="floor").neg()
    free = vision & order.isinf()
    ranks = torch.arange(seq, device=device).expand(bsz, seq)
    for j in range(pivots.shape[1]):
        apart = (-similarity[:, j]).masked_fill(~free, float("-inf"))
        rank = torch.empty_like(ranks).scatter_(1, apart.sort(dim=1, descending=True, stable=True).indices, ranks)
        take = free & (rank < per_pivot[:, None]) & pivot_ok[:, j : j + 1]
        order = torch.where(take, (taken[:, None] + rank).to(order.dtype), order)
        taken = taken + take.sum(1)
        free &= ~take
    return -order


class DARTKeyRule(RoutingRule):
    """Layer K-1: runs densely and leaves its keys' L1 norms for layer K's pivots."""

    def route(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if inputs.vision_mask is not None:
            with torch.no_grad():
                inputs.shared[KEY_NORMS] = key_l1_norms(layer, hidden, position_embeddings)
        return None


class DARTPruneRule(RoutingRule):
    """Layers >= K: layer K ranks the vision tokens (:func:`duplication_ranking`) on its input under the model's
    final ``norm``; every layer >= K keeps the top ``round(n_vision * keep)`` of that one ranking."""

    rounding = "round"

    def __init__(self, keep: float, norm: nn.Module, pivots: int, text_pivots: int, first: bool) -> None:
        self.ratio, self.norm, self.counts, self.first = float(keep), norm, (pivots, text_pivots), first

    def route(
        self, layer: nn.Module, hidden: torch.Tensor, inputs: RoutingInputs, position_embeddings: object = None
    ) -> RouteDecision | None:
        if inputs.vision_mask is None:
            return None  # text only (decode steps): every token, against the pruned cache
        if self.first:
            norms = inputs.shared.get(KEY_NORMS)
            if norms is None:
                raise RuntimeError("DART's key norms are missing: layer K-1 did not run in this forward.")
            real = inputs.real_mask(hidden)
            with torch.no_grad():
                ranking = duplication_ranking(self.norm(hidden), norms, inputs.vision_mask & real, real, self.ratio,
                                              self.counts)  # fmt: skip
            inputs.shared[SCORES] = ranking[..., None]
        scores = inputs.shared.get(SCORES)
        if scores is None:
            raise RuntimeError("DART's ranking is missing: layer K did not run in this forward.")
        # No per-token weight to record: the ranking is an order, not a score.
        return RouteDecision(scores=scores, candidates=VISION, candidate_mask=lambda: inputs.vision_mask)
