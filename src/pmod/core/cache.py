"""KV-cache bookkeeping for layers that cache fewer tokens than the sequence has.

A routed layer writes K/V only for the tokens it processed. Rows of a batch keep different numbers of tokens, so
the compacted K/V carry "filler" slots that must stay masked at every later step. :class:`RoutedCache` is a
``DynamicCache`` that remembers, per routed layer, which cached slots are real, and moves that record along with
the tensors when generation reorders (beam search), selects, repeats or crops the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, StaticCache

from pmod.core.compat import CACHE_NAME, CROP_TAKES_COUNT
from pmod.core.deprecation import renamed_attributes


def cache_of(output: Any) -> DynamicCache | None:
    """The KV cache of a model output or of ``generate(..., return_dict_in_generate=True)``, on any transformers."""
    return getattr(output, CACHE_NAME, None)


def cache_kwargs(cache: DynamicCache | None) -> dict[str, DynamicCache | None]:
    """The keyword that hands ``cache`` to a model's forward or ``generate``: ``model(**inputs, **cache_kwargs(c))``."""
    return {CACHE_NAME: cache}


class RoutedCache(DynamicCache):
    """A ``DynamicCache`` that also tracks which cached slots of each routed layer hold real tokens.

    Per routed layer the record is a bool ``[B, 1, 1, slots]`` (the shape sdpa takes as a key mask), or None while
    every slot is real. Layers that never record (dense layers) cache every token and need no record.
    """

    def _slots(self) -> dict[int, torch.Tensor | None]:
        if "_routed_slots" not in self.__dict__:
            self._routed_slots: dict[int, torch.Tensor | None] = {}
        return self._routed_slots

    def extend_slots(
        self, layer_idx: int, new_valid: torch.Tensor | None, new: int, bsz: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Record the validity ``new_valid`` [B, 1, 1, new] (None: all real) of the ``new`` slots the layer is about
        to cache. Returns the records before and after, each None while every slot is real: the one after is the key
        mask of a one-token step."""
        slots = self._slots()
        past = slots.get(layer_idx)
        cached = self.get_seq_length(layer_idx)
        rows = past.shape[0] if past is not None else self._rows(layer_idx)
        if cached and rows != bsz:
            raise ValueError(
                f"The cache holds {rows} rows but the batch has {bsz}; pass a cache built for this batch (or none)."
            )
        if past is None and new_valid is None:
            slots[layer_idx] = None
            return None, None
        if past is None and cached:
            past = torch.ones(bsz, 1, 1, cached, dtype=torch.bool, device=new_valid.device)
        if new_valid is None:
            new_valid = torch.ones(bsz, 1, 1, new, dtype=torch.bool, device=past.device)
        slots[layer_idx] = new_valid if past is None else torch.cat([past, new_valid], dim=-1)
        return past, slots[layer_idx]

    def _rows(self, layer_idx: int) -> int | None:
        keys = getattr(self.layers[layer_idx], "keys", None) if layer_idx < len(self.layers) else None
        return None if keys is None or keys.numel() == 0 else keys.shape[0]

    def slot_mask(self, layer_idx: int) -> torch.Tensor | None:
        """Bool [B, cached slots] of a routed layer (True = real token), or None for a dense layer."""
        slots = self._slots()
        if layer_idx not in slots:
            return None
        record = slots[layer_idx]
        if record is None:
            keys = self.layers[layer_idx].keys
            return torch.ones(keys.shape[0], keys.shape[-2], dtype=torch.bool, device=keys.device)
        return record[:, 0, 0, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for i, valid in self._slots().items():
            if valid is not None:
                self._routed_slots[i] = valid.index_select(0, beam_idx.to(valid.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for i, valid in self._slots().items():
            if valid is not None:
                self._routed_slots[i] = valid[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for i, valid in self._slots().items():
            if valid is not None:
                self._routed_slots[i] = valid.repeat_interleave(repeats, dim=0)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count) from every layer.

        Before transformers 5.24 a value >= 0 is the length to keep (assisted decoding passes it): measured on layer
        0, which is always dense, and turned into a count, since routed layers hold fewer slots than tokens.
        Exact when the dropped tokens were processed by every layer, which holds for generated (text) tokens under
        p-MoD, MoD and FastV. Under gamma-MoD a generated token may skip a layer in every row and leave no slot there.
        """
        if not CROP_TAKES_COUNT and tokens_to_remove >= 0:
            tokens_to_remove = min(tokens_to_remove - self.get_seq_length(), 0)
            if tokens_to_remove == 0:
                return  # the count 0 would mean "keep nothing" to these versions
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            for i, valid in self._slots().items():
                if valid is not None:
                    self._routed_slots[i] = valid[..., :tokens_to_remove]

    def reset(self) -> None:
        """Empty the cache for a new prompt, keeping the object (``generate`` and user code may hold it)."""
        super().reset()
        # Before 5.24 a dynamic layer's reset zeroes its tensors but keeps their length, and later steps would attend
        # to those zero slots: drop them, as 5.24 does.
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
        self._slots().clear()


class RoutedStaticCache(StaticCache):
    """A ``StaticCache`` for routed models: preallocated K/V, written in place, graph-capturable decode steps.

    Each layer of transformers' static cache writes at its own cumulative length, so a routed layer that cached K
    slots in the prefill writes its decode tokens at K, K + 1, ... Per routed layer a static slot record
    ``[B, 1, 1, max_cache_len]`` (False until written) is the key mask of its decode steps: one in-place write per
    step, no host sync, no shape that changes. Made from the ``StaticCache`` that ``generate(...,
    cache_implementation="static")`` builds (:func:`as_routed_cache`); the prefill must start from an empty cache and
    decode one token per step (assisted decoding and beam search use :class:`RoutedCache`).
    """

    def _records(self) -> dict[int, torch.Tensor]:
        if "_routed_records" not in self.__dict__:
            self._routed_records: dict[int, torch.Tensor] = {}
        return self._routed_records

    def _filled(self) -> set[int]:
        if "_routed_filled" not in self.__dict__:
            self._routed_filled: set[int] = set()
        return self._routed_filled

    def is_prefilled(self, layer_idx: int) -> bool:
        """Whether the layer has cached its prefill (known on the host, read from no tensor)."""
        return layer_idx in self._filled()

    def write_slots(
        self, layer_idx: int, new_valid: torch.Tensor | None, new: int, like: torch.Tensor
    ) -> torch.Tensor:
        """Record the validity ``new_valid`` [B, 1, 1, new] (None: all real) of the slots the layer is about to
        cache, at its cumulative length; returns the record (the key mask of a one-token step)."""
        records = self._records()
        if layer_idx not in self._filled():  # the prefill: the layer's cache is empty
            size = self.layers[layer_idx].max_cache_len
            record = records.get(layer_idx)
            if record is None or record.shape[0] != like.shape[0]:
                record = torch.zeros(like.shape[0], 1, 1, size, dtype=torch.bool, device=like.device)
                if not torch.compiler.is_compiling():
                    torch._dynamo.mark_static_address(record)  # a fixed address, as the K/V buffers: CUDA graphs
                records[layer_idx] = record
            record[..., :new] = True if new_valid is None else new_valid
            self._filled().add(layer_idx)
            return record
        record = records[layer_idx]
        if new != 1:
            raise ValueError(
                f"pmod's static cache decodes one token per forward, got {new}; use the dynamic cache (the default) "
                "for chunked prefill, assisted decoding or beam search."
            )
        at = self.layers[layer_idx].cumulative_length.reshape(1)  # where this layer writes its next slot
        return record.index_fill_(3, at, True) if new_valid is None else record.index_copy_(3, at, new_valid)

    def slot_mask(self, layer_idx: int) -> torch.Tensor | None:
        """Bool [B, max_cache_len] of a routed layer (True = a real token cached there), or None for a dense layer."""
        record = self._records().get(layer_idx)
        return None if record is None else record[:, 0, 0, :]

    def reset(self) -> None:
        """Empty the cache for a new prompt, in place (``generate`` reuses a static cache of the same size, and
        compiled decode steps keep the addresses they captured)."""
        super().reset()
        for record in self._records().values():
            record.zero_()
        self._filled().clear()


def as_routed_cache(cache: DynamicCache | StaticCache) -> RoutedCache | RoutedStaticCache:
    """Make a plain ``DynamicCache`` a :class:`RoutedCache`, and a plain ``StaticCache`` a :class:`RoutedStaticCache`,
    in place.

    In place because ``generate`` and user code keep references to the object they created; the classes add
    methods and one attribute only, so switching is safe.
    """
    if isinstance(cache, (RoutedCache, RoutedStaticCache)):
        return cache
    if type(cache) is DynamicCache:
        cache.__class__ = RoutedCache
    elif type(cache) is StaticCache:
        cache.__class__ = RoutedStaticCache
    else:
        raise TypeError(
            f"Routed layers cache a different number of tokens per layer and cannot use {type(cache).__name__}; "
            f"use the default dynamic cache (pass no cache, or a transformers.DynamicCache / pmod.RoutedCache) or "
            f"a transformers.StaticCache (generate(..., cache_implementation='static'))."
        )
    return cache


@dataclass
class KVCacheSize:
    """Size of a KV cache: total bytes, and per layer the cached slots and real tokens (row 0 first)."""

    total_bytes: int
    layer_bytes: list[int]
    layer_slots: list[int]
    layer_tokens: list[list[int]]


def kv_cache_bytes(cache: DynamicCache) -> KVCacheSize:
    """Bytes held by a cache's key/value tensors, with per-layer slot and per-row real-token counts."""
    layer_bytes, layer_slots, layer_tokens = [], [], []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            layer_bytes.append(0)
            layer_slots.append(0)
            layer_tokens.append([])
            continue
        layer_bytes.append(keys.numel() * keys.element_size() + values.numel() * values.element_size())
        layer_slots.append(keys.shape[-2])
        valid = cache.slot_mask(i) if isinstance(cache, RoutedCache) else None
        if valid is None:
            layer_tokens.append([keys.shape[-2]] * keys.shape[0])
        else:
            layer_tokens.append(valid.sum(dim=1).tolist())
    return KVCacheSize(sum(layer_bytes), layer_bytes, layer_slots, layer_tokens)


#: The names of pmod <= 0.2, kept for one release (they warn): the caches serve every method, not p-MoD alone.
RENAMED = {"PModCache": "RoutedCache", "PModStaticCache": "RoutedStaticCache"}
__getattr__ = renamed_attributes(__name__, RENAMED)
