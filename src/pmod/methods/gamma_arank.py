"""ARank (gamma-MoD, Eq. 5): the mean over heads of the numerical rank of a layer's attention map, averaged over
samples; layers with a low ARank attend to few directions and become MoD layers.

``A_h = Q_h K_h^T`` over a sample's real tokens, with Q and K as the layer computes them (after RoPE) and no causal
mask (a causal mask would make every matrix full rank). The rank is ``torch.linalg.matrix_rank`` in float32 with
its default tolerance; it is at most the head dimension. ``variant="softmax"`` reproduces the original code's
measure instead: the post-softmax causal attention with its diagonal set to zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from pmod.core.backbone import backbone_for
from pmod.core.compat import rotary

Variant = Literal["scores", "softmax"]


def numerical_rank(matrices: torch.Tensor) -> torch.Tensor:
    """Rank of each matrix of ``matrices`` [..., n, m], in float32 with ``matrix_rank``'s default tolerance."""
    return torch.linalg.matrix_rank(matrices.float())


def query_key(
    attn: nn.Module, normed: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Q [B, H, T, d] and K [B, H, T, d] (KV heads repeated to H) as ``attn`` computes them, RoPE applied."""
    bsz, seq, _ = normed.shape
    head_dim = attn.head_dim
    q = attn.q_proj(normed).view(bsz, seq, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(bsz, seq, -1, head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = rotary(attn)(q, k, cos, sin)
    return q, k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def attention_rank(q: torch.Tensor, k: torch.Tensor, variant: Variant = "scores", scaling: float = 1.0) -> float:
    """Mean rank over heads of one sample's attention maps; ``q``, ``k`` [H, n, d] over its real tokens."""
    scores = q.float() @ k.float().transpose(-1, -2)
    if variant == "softmax":
        n = scores.shape[-1]
        causal = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        probs = (scores * scaling).masked_fill(~causal, float("-inf")).softmax(dim=-1)
        scores = probs * (~torch.eye(n, dtype=torch.bool, device=scores.device))
    elif variant != "scores":
        raise ValueError(f"Unknown ARank variant {variant!r}; use 'scores' (the paper's) or 'softmax' (the code's).")
    return float(numerical_rank(scores).float().mean())


def layer_aranks(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], variant: Variant = "scores"
) -> list[float]:
    """Per-layer ARank of a (dense) model, averaged over every real row of ``batches`` (model inputs)."""
    layers = backbone_for(model).decoder_layers(model)
    sums = [0.0] * len(layers)
    rows = 0
    state: dict[str, torch.Tensor | None] = {"real": None}

    def hook(index: int):
        def measure(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            q, k = query_key(module.self_attn, module.input_layernorm(hidden), kwargs["position_embeddings"])
            for b in range(hidden.shape[0]):
                keep = state["real"][b] if state["real"] is not None else slice(None)
                sums[index] += attention_rank(q[b][:, keep], k[b][:, keep], variant, module.self_attn.scaling)

        return measure

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")
                state["real"] = None if mask is None else mask.bool()
                model(**batch, use_cache=False)
                rows += batch["input_ids"].shape[0]
    finally:
        for handle in handles:
            handle.remove()
    if rows == 0:
        raise ValueError("ARank needs at least one sample; pass a non-empty set of batches.")
    return [s / rows for s in sums]
