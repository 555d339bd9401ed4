"""FastV at run time: layer K-1 computes the last token's attention row, layers >= K keep the top vision tokens
by it (the settings are :class:`pmod.methods.fastv.FastVConfig`)."""

from __future__ import annotations

import torch
from torch import nn

from pmod.core.compaction import gather_positions, gather_tokens
from pmod.core.compat import rotary
from pmod.core.plan import VISION
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule

SCORES = "fastv_scores"


def head_norm(attn: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """``states`` [B, T, heads, d] through the attention's per-head norm ``name`` (Qwen3's q_norm / k_norm, applied
    before RoPE), unchanged where the model has none (Llama, Qwen2)."""
    norm = getattr(attn, name, None)
    return states if norm is None else norm(states)


def last_token_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    real: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention [B, T] that each row's last real token pays every token in ``layer``, mean over heads.

    ``keys`` (bool [B, T]) limits the tokens attended to (the last token itself always is): PyramidDrop's later
    stages attend only to the tokens earlier stages kept. Costs one key projection over the sequence, one query
    projection and one score row per row.
    """
    attn = layer.self_attn
    bsz, seq = real.shape
    positions = torch.arange(seq, device=real.device).expand(bsz, seq)
    last = positions.masked_fill(~real, -1).max(dim=1).values  # [B]
    normed = layer.input_layernorm(hidden)
    at_last = last.view(bsz, 1)
    # [1 or B, T, d], or M-RoPE's [3, 1 or B, T, d] (Qwen2-VL up to transformers ~5.15)
    cos, sin = (t.expand(*t.shape[:-3], bsz, *t.shape[-2:]) for t in position_embeddings)
    q = attn.q_proj(gather_tokens(normed, at_last)).view(bsz, 1, -1, attn.head_dim)
    q = head_norm(attn, "q_norm", q).transpose(1, 2)  # [B, H, 1, d]
    k = attn.k_proj(normed).view(bsz, seq, -1, attn.head_dim)
    k = head_norm(attn, "k_norm", k).transpose(1, 2)  # [B, KV, T, d]
    apply = rotary(attn)
    q = apply(q, q, gather_positions(cos, at_last, 1), gather_positions(sin, at_last, 1))[0]
    k = apply(k, k, cos, sin)[1].repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * attn.scaling  # [B, H, T]
    visible = real & (positions <= last[:, None])
    if keys is not None:
        visible &= keys | (positions == last[:, None])
    probs = scores.masked_fill(~visible[:, None, :], float("-inf")).softmax(dim=-1)
    return probs.mean(dim=1)


class FastVScoreRule(RoutingRule):
    """Layer K-1: runs densely and leaves the last-token attention row for the pruned layers, or, given a
    ``random_seed``, random scores (the random control: the same kept counts, no ranking). The i-th vision token of
    every row scores the i-th number of one uniform draw seeded with ``random_seed``, so the tokens kept depend on the
    seed and the row's vision count only: not on the batch, the padding, the forwards before or the device."""

    def __init__(self, random_seed: int | None = None) -> None:
        self.random_seed = random_seed
        self.draw: torch.Tensor | None = None

    def route(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if inputs.vision_mask is not None:
            real = inputs.real_mask(hidden)
            with torch.no_grad():
                inputs.shared[SCORES] = (
                    last_token_attention(layer, hidden, real, position_embeddings)[..., None]
                    if self.random_seed is None
                    else self._random_scores(inputs.vision_mask)
                )
        return None

    def _random_scores(self, vision: torch.Tensor) -> torch.Tensor:
        length = vision.shape[1]
        if self.draw is None or len(self.draw) < length or self.draw.device != vision.device:
            generator = torch.Generator().manual_seed(self.random_seed)  # on the CPU: one stream on every device
            self.draw = torch.rand(max(length, 1024), generator=generator).to(vision.device)
        order = (vision.long().cumsum(dim=1) - 1).clamp(min=0)  # the index of each vision token in its row
        return self.draw[order][..., None]


class FastVPruneRule(RoutingRule):
    """Layers >= K: the same kept vision tokens in every layer, ranked once per forward (the plan shares one
    selection among the layers, since they rank the same scores at the same ratio)."""

    rounding = "round"

    def __init__(self, keep: float) -> None:
        self.ratio = float(keep)

    def route(
        self, layer: nn.Module, hidden: torch.Tensor, inputs: RoutingInputs, position_embeddings: object = None
    ) -> RouteDecision | None:
        if inputs.vision_mask is None:
            return None  # text only (decode steps): every token, against the pruned cache
        scores = inputs.shared.get(SCORES)
        if scores is None:
            raise RuntimeError("FastV's ranking is missing: layer K-1 did not run in this forward.")
        return RouteDecision(scores=scores, candidates=VISION, candidate_mask=lambda: inputs.vision_mask,
                             weights=scores[..., 0])  # fmt: skip
