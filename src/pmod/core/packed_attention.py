"""Padding-free ("packed") prefill for the compacted tokens of a routed layer.

Rows of a batch keep different numbers of tokens (unequal images, unequal prompts). The padded path pads every row
to the longest and gives attention a boolean mask: the mask rules out sdpa's flash kernel (the memory-efficient
kernel then computes the full square instead of the causal half), and the projections and MLP also run on the
filler slots. The packed path lays the processed tokens of all rows end to end as one sequence ``[1, N, D]``, runs
the layer's own attention module and MLP on it, and gives the attention kernel the row boundaries (``cu_seqlens``):

* on CUDA in fp16/bf16, PyTorch's variable-length flash attention (``torch.nn.attention.varlen``);
* elsewhere one causal sdpa call per row (exact; it lets the CPU tests check the packing against the padded path).

The layer's attention module is the model's own (Llama, Qwen2, Qwen3, Qwen2.5-VL text, ...), so its projections,
norms and RoPE stay untouched: :class:`PackedSdpa` intercepts the one ``scaled_dot_product_attention`` call that
transformers' ``sdpa`` attention makes, and :class:`PackedCacheWriter` stores the packed keys/values in the padded
slot layout the :class:`~pmod.core.cache.RoutedCache` keeps, so decoding after a packed prefill is unchanged.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pmod.core.compat import has_rope_axis

#: ``pmod.set_attention_path`` values: pick per forward, always pad, always pack.
ATTENTION_PATHS = ("auto", "padded", "packed")


def varlen_flash_available(t: torch.Tensor) -> bool:
    """Whether PyTorch's variable-length flash attention can run on ``t`` (CUDA, fp16/bf16, torch >= 2.10)."""
    return t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


@functools.cache
def _varlen_attn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@functools.cache
def _varlen_takes() -> frozenset[str]:
    """The keyword parameters of the installed ``varlen_attn`` (they changed between torch releases)."""
    return frozenset(inspect.signature(_varlen_attn()).parameters)


def packed_slot_index(slot_valid: torch.Tensor, total: int) -> torch.Tensor:
    """Flat indices [N] of the valid slots of a compacted batch ``[B, K]`` (row by row, slot order), ``N = total``
    valid slots in all: known on the host already, so finding them costs no device sync."""
    return torch.nonzero_static(slot_valid.flatten(), size=total).squeeze(1)


def pack_slots(t: torch.Tensor, flat: torch.Tensor, per_token_dims: int) -> torch.Tensor:
    """The valid slots (``flat`` from :func:`packed_slot_index`) of a compacted tensor as one row: ``[B, K, ...]``
    -> ``[1, N, ...]``; M-RoPE's extra leading axis (``[A, B, K, ...]`` -> ``[A, 1, N, ...]``) is kept.
    ``per_token_dims`` as in :func:`~pmod.core.compaction.gather_positions`."""
    if not has_rope_axis(t, per_token_dims):
        return t.flatten(0, 1).index_select(0, flat).unsqueeze(0)
    return t.flatten(1, 2).index_select(1, flat).unsqueeze(1)


def unpack_slots(packed: torch.Tensor, flat: torch.Tensor, filler: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_slots` for ``[1, N, D]``: the padded ``[B, K, D]``, filler slots taken from ``filler``."""
    return filler.flatten(0, 1).index_copy(0, flat, packed[0].to(filler.dtype)).view_as(filler)


def cumulative_lengths(slot_valid: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` [B + 1] (int32) of the packed rows; valid slots come first in every row."""
    counts = slot_valid.sum(dim=1, dtype=torch.int32)
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    *,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each packed row. ``query`` [1, H, N, d], ``key``/``value`` [1, Hkv, N, d] (Hkv
    divides H); returns [1, H, N, d]."""
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # grouped-query attention: every query head reads its group's key/value head
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [N, H, d]
    if dropout_p == 0.0 and varlen_flash_available(q):
        params = _varlen_takes()
        # torch 2.10 takes ``is_causal`` and no ``scale``; later versions express causality as the window (-1, 0).
        options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "scale" in params:
            options["scale"] = scale
        elif scale is not None:
            q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(d)
        out = _varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)
    else:
        bounds = cu_seqlens.tolist()
        out = torch.cat([
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                is_causal=True, scale=scale, dropout_p=dropout_p,
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ])  # fmt: skip
    return out.transpose(0, 1).unsqueeze(0)


class PackedSdpa(TorchFunctionMode):
    """While active, ``F.scaled_dot_product_attention`` on the packed sequence runs :func:`packed_causal_attention`.

    transformers' ``sdpa`` attention calls it with ``is_causal=True`` and no mask when it gets no mask for a
    multi-token query, which is what the routed layer gives it on the packed path; any other call (a mask, or
    another length than the ``total`` packed tokens) would mean the attention module did something this path does
    not know, and raises.
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_len: int, total: int) -> None:
        super().__init__()
        self.cu_seqlens, self.max_len, self.total = cu_seqlens, max_len, total

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        call = {**dict(zip(names, args)), **kwargs}
        query = call["query"]
        if call.get("attn_mask") is not None or not call.get("is_causal", False) or query.shape[-2] != self.total:
            raise RuntimeError(
                "pmod's packed attention expected a causal, mask-free sdpa call from the attention module; this "
                "model's attention does something else. Use pmod.set_attention_path(model, 'padded')."
            )
        return packed_causal_attention(
            query, call["key"], call["value"], self.cu_seqlens, self.max_len,
            scale=call.get("scale"), dropout_p=call.get("dropout_p", 0.0),
        )  # fmt: skip


class PackedCacheWriter:
    """Stands in for the model's cache in a packed prefill: stores the layer's new keys/values in the padded slot
    layout ``[B, Hkv, K, d]`` the cache keeps (filler slots zero; the cache marks them invalid), and hands the
    packed ones to attention. Only for a layer whose cache is still empty: it returns the new keys alone."""

    def __init__(self, cache: Any, slot_valid: torch.Tensor, flat: torch.Tensor) -> None:
        self.cache, self.slot_valid, self.flat = cache, slot_valid, flat

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        bsz, slots = self.slot_valid.shape

        def padded(t: torch.Tensor) -> torch.Tensor:  # [1, Hkv, N, d] -> [B, Hkv, K, d]
            rows = t.new_zeros(bsz * slots, t.shape[1], t.shape[3]).index_copy(0, self.flat, t[0].transpose(0, 1))
            return rows.view(bsz, slots, t.shape[1], t.shape[3]).transpose(1, 2)

        self.cache.update(padded(key_states), padded(value_states), layer_idx, *args, **kwargs)
        return key_states, value_states

    def __getattr__(self, name: str) -> Any:  # anything else the attention module asks of its cache
        return getattr(self.cache, name)
