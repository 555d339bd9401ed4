"""The attention masks of a routed layer's compacted (or full) tokens, over no cache, a dynamic or a static cache.

Prefill over an empty cache needs none (filler slots sit after every real slot, and causal attention never reaches
them); steps over a cache read the layer's own slot record, since a routed layer caches fewer slots than the dense
layers and transformers' mask does not fit it.
"""

from __future__ import annotations

import torch
from torch import nn

from pmod.core.cache import RoutedCache, RoutedStaticCache
from pmod.core.compaction import build_attention_mask
from pmod.core.compat import attention_implementation
from pmod.core.plan import ForwardPlan, Selection


def compacted_mask(
    layer: nn.Module, cache: RoutedCache | None, past: int, selection: Selection, plan: ForwardPlan, dtype: torch.dtype
) -> torch.Tensor | None:
    """The attention mask of the compacted slots; records their validity in the cache. Over an empty cache none
    is needed (fillers sit after every real slot, and causal attention never reaches them), except for eager
    attention, which has no causal mode of its own."""
    bsz, slots = selection.index.shape[:2]
    valid = None if selection.valid is None else selection.valid.view(bsz, 1, 1, slots)
    before = None
    if cache is not None:
        before, _ = cache.extend_slots(layer.routed_layer_idx, valid, slots, bsz)
    implementation = attention_implementation(layer)
    if past == 0:
        if implementation != "eager":
            return None
        return plan.shared(("causal", slots, dtype), lambda: causal_mask(slots, dtype, selection.index.device))
    return over_cache(valid, before, bsz, slots, past, implementation, dtype, selection.index.device)


def every_token_mask(
    layer: nn.Module,
    model_mask: torch.Tensor | None,
    cache: RoutedCache | None,
    plan: ForwardPlan,
    hidden: torch.Tensor,
) -> torch.Tensor | None:
    """The attention mask when the layer runs every token: the model's own over an empty layer cache; else built
    from the layer's slot record (a routed layer caches fewer slots than the dense layers)."""
    if cache is None:
        return model_mask
    bsz, seq = hidden.shape[:2]
    if isinstance(cache, RoutedStaticCache):
        return static_mask(layer, cache, None if model_mask is None else plan.token_valid(), seq, hidden, model_mask)
    past = cache.get_seq_length(layer.routed_layer_idx)
    # The model's mask is None only when no token of the whole batch is padding.
    new_valid = None if model_mask is None else plan.token_valid()
    before, after = cache.extend_slots(layer.routed_layer_idx, new_valid, seq, bsz)
    if past == 0:
        return model_mask
    implementation = attention_implementation(layer)
    if seq == 1 and (after is None or implementation == "sdpa"):
        return after  # a one-token step: the key mask alone (None: every cached slot is real)
    if seq == 1 and implementation.startswith("flash_attention"):
        return after.view(bsz, -1).to(torch.int32)  # flash attention's 2-D key padding mask, no host check
    return over_cache(new_valid, before, bsz, seq, past, implementation, hidden.dtype, hidden.device)


def static_mask(
    layer: nn.Module,
    cache: RoutedStaticCache,
    new_valid: torch.Tensor | None,
    new: int,
    like: torch.Tensor,
    model_mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The attention mask over a static cache's full buffers. Prefill: the model's own when every token runs
    (built for the static shape), none when compacted (sdpa's causal mask is aligned top-left: slot i sees slots
    0..i, never the unwritten ones); flash attention reads the slot record as its key mask. Decode: the record."""
    prefill = not cache.is_prefilled(layer.routed_layer_idx)
    record = cache.write_slots(layer.routed_layer_idx, new_valid, new, like)
    implementation = attention_implementation(layer)
    if implementation.startswith("flash_attention"):
        return record.view(record.shape[0], -1)
    if prefill:
        if implementation != "sdpa" and model_mask is None:
            raise ValueError(f"pmod's static cache runs with sdpa or flash attention, not {implementation!r}.")
        return model_mask
    if implementation == "sdpa":
        return record
    return torch.zeros(record.shape, dtype=like.dtype, device=like.device).masked_fill_(
        ~record, torch.finfo(like.dtype).min
    )


def over_cache(
    new_valid: torch.Tensor | None,
    before: torch.Tensor | None,
    bsz: int,
    new: int,
    past: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The general mask of ``new`` slots over ``past`` cached ones (their records, None: all real), causal in slot
    order: chunks over a cache, and steps of attention backends without a key-mask shortcut."""
    new_valid = torch.ones(bsz, new, dtype=torch.bool, device=device) if new_valid is None else new_valid
    before = torch.ones(bsz, past, dtype=torch.bool, device=device) if before is None else before
    return build_attention_mask(new_valid.view(bsz, new), before.view(bsz, past), implementation, dtype)


def causal_mask(slots: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Eager attention's additive causal mask [1, 1, K, K]."""
    blocked = torch.ones(slots, slots, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(1, 1, slots, slots, dtype=dtype, device=device).masked_fill_(blocked, torch.finfo(dtype).min)
