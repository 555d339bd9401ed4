"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core.cache`` and
``pmod.core.routed_layer`` (see ``benchmarks/mutation/run_mutation.py``). Expected values are worked out by hand in
the comments, never read back from the code under test."""

from __future__ import annotations

import torch
from transformers import DynamicCache

import pmod
from pmod import PModConfig
from pmod.core.cache import PModCache, as_pmod_cache, cache_of, kv_cache_bytes
from pmod.testing import tiny_llama


def test_cache_of_an_output_without_a_cache_is_none() -> None:
    assert cache_of(object()) is None


def test_kv_cache_bytes_with_an_empty_layer_between_filled_ones() -> None:
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)  # 2 rows, 1 KV head, 3 tokens, dim 4
    cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 2)  # layer 1 stays empty; layer 2: 1 element
    size = kv_cache_bytes(cache)
    # layer 0: K and V of 2 * 1 * 3 * 4 float32 = 96 bytes each; layer 2: 4 bytes each.
    assert size.layer_bytes == [192, 0, 8] and size.total_bytes == 200
    assert size.layer_slots == [3, 0, 1]
    assert size.layer_tokens == [[3, 3], [], [1]]


def record_two_rows() -> PModCache:
    cache = as_pmod_cache(DynamicCache())
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    cache.pmod_record_slots(0, torch.tensor([[True, False, True], [True, True, False]]))
    return cache


def test_repeating_rows_repeats_their_slot_records() -> None:
    # Row 0 (T, F, T) and row 1 (T, T, F), each repeated twice in place, as beam search and sampling expand a batch.
    cache = record_two_rows()
    cache.batch_repeat_interleave(2)
    assert cache.pmod_slot_mask(0).tolist() == [[True, False, True]] * 2 + [[True, True, False]] * 2
    assert cache.layers[0].keys.shape[0] == 4


def test_set_attention_path_defaults_to_auto() -> None:
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5]))
    pmod.set_attention_path(model, "padded")
    pmod.set_attention_path(model)
    assert [layer.pmod_attention_path for layer in pmod.routed_layers(model).values()] == ["auto", "auto"]
