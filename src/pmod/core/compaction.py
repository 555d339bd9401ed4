"""From a processed-token mask to the compacted batch a routed layer runs, and back.

Rows keep different numbers of tokens; the compacted batch is padded to the largest count K with "filler" slots.
Filler slots point at distinct unprocessed positions of their row, never serve as keys for real tokens, and write
back the value those positions already have, so the scatter is exact.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmod.core.compat import has_rope_axis

#: Attention backends whose masks :func:`build_attention_mask` knows how to build.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def kept_counts(n_candidates: torch.Tensor, ratio: float, rounding: str = "floor") -> torch.Tensor:
    """``schedules.kept_count`` per row on the device: ``floor(ratio * n)``, or with ``rounding="round"`` the nearest
    integer (halves to even), in the same float64 arithmetic, so the analytic accounting matches what runs."""
    scaled = n_candidates.double() * ratio
    return (torch.round(scaled) if rounding == "round" else torch.floor(scaled)).long()


def top_k_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per row, the ``k[row]`` candidates with the highest scores (bool [B, T]).

    Ties are broken by the lower position (a stable sort); non-candidates are never chosen.
    """
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    positions = torch.arange(candidates.shape[1], device=candidates.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return candidates & (rank < k[:, None])


def compact_index(processed: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, K] of the processed tokens of each row in original order, K = largest count (or ``k``).

    Rows with fewer processed tokens are filled with their first unprocessed positions (all distinct).
    Returns ``(index, slot_valid)``, where ``slot_valid`` [B, K] is False on filler slots.
    """
    counts = processed.sum(dim=1)
    k = int(counts.max()) if k is None else k
    # Stable descending sort of 1/0 puts processed tokens first, each group in original order.
    index = torch.sort(processed.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
    slot_valid = torch.arange(k, device=processed.device)[None, :] < counts[:, None]
    return index, slot_valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` [B, T, ...] gathered along dim 1 with ``index`` [B, K]."""
    shape = (*index.shape, *x.shape[2:])
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def gather_positions(t: torch.Tensor, index: torch.Tensor, per_token_dims: int) -> torch.Tensor:
    """RoPE cos/sin (``per_token_dims=1``: [1 or B, T, d], or M-RoPE's [3, 1 or B, T, d]) or position ids (``0``:
    [1 or B, T], or [3 or 4, 1 or B, T]) at the processed rows ``index`` [B, K].

    A leading axis beyond batch and sequence (M-RoPE's, up to transformers ~5.15) is kept and gathered per axis.
    """
    bsz = index.shape[0]
    if not has_rope_axis(t, per_token_dims):
        return gather_tokens(t.expand(bsz, *t.shape[1:]), index)
    return torch.stack([gather_tokens(axis.expand(bsz, *axis.shape[1:]), index) for axis in t])


def build_attention_mask(
    slot_valid: torch.Tensor,
    past_valid: torch.Tensor | None,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The attention mask for K compacted queries over ``past_valid`` cached keys plus the K new keys.

    Causal in slot order (slot order is original order); invalid keys are masked; each query may attend to itself
    so filler slots never see an all-masked row (which would give NaN).
    """
    bsz, k = slot_valid.shape
    key_valid = slot_valid if past_valid is None else torch.cat([past_valid, slot_valid], dim=1)
    past = key_valid.shape[1] - k
    if implementation.startswith("flash_attention"):
        # FlashAttention takes a 2-D key padding mask and aligns causality bottom-right; fillers sit at the end.
        return None if bool(key_valid.all()) else key_valid.to(torch.int32)
    if implementation not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"Routed layers do not support attn_implementation={implementation!r}; load the model with one of "
            f"{SUPPORTED_ATTENTION}."
        )
    if implementation == "sdpa" and (k == 1 or past == 0) and bool(key_valid.all()):
        return None  # sdpa's own causal path is exact here (no padding, no crop of a longer cache)
    q_pos = torch.arange(k, device=slot_valid.device)[:, None] + past
    k_pos = torch.arange(past + k, device=slot_valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    allowed = allowed[:, None]  # [B, 1, K, past + K]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def sdpa_without_cudnn() -> contextlib.AbstractContextManager:
    """The sdpa backends the user enabled, minus cuDNN, for the attention of a routed layer.

    cuDNN's sdpa builds an execution plan for every new sequence length. A routed layer caches its own number of
    tokens, so every decode step meets one new length per routed layer instead of one for the whole model, and every
    new prompt length one per routed layer: on an H100 (torch 2.11) the first 128-token p-MoD generation took 97 s
    instead of 4 s, and a p-MoD prefill of a new length 1.0 s instead of 0.15 s. Flash and memory-efficient
    attention have no per-shape set-up.
    """
    if torch.compiler.is_compiling() or not torch.backends.cuda.cudnn_sdp_enabled():
        return contextlib.nullcontext()  # compiled code picks its own kernel; reading the flags would break the graph
    backends = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if enabled
    ]
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()
