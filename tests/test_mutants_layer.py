"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core.cache`` and
``pmod.core.routed_layer`` (see ``benchmarks/mutation/run_mutation.py``). Expected values are worked out by hand in
the comments, never read back from the code under test."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import pmod
from pmod import PModConfig
from pmod.core import packed_attention, routed_layer
from pmod.core.cache import RoutedCache, as_routed_cache, cache_kwargs, cache_of, kv_cache_bytes
from pmod.core.plan import ForwardPlan, Selection
from pmod.core.routed_layer import RoutingInputs
from pmod.testing import randomize_routers, routed_batch, tiny_llama


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


def record_two_rows() -> RoutedCache:
    cache = as_routed_cache(DynamicCache())
    cache.extend_slots(0, torch.tensor([[True, False, True], [True, True, False]]).view(2, 1, 1, 3), 3, 2)
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)  # what the layer then caches
    return cache


def test_repeating_rows_repeats_their_slot_records() -> None:
    # Row 0 (T, F, T) and row 1 (T, T, F), each repeated twice in place, as beam search and sampling expand a batch.
    cache = record_two_rows()
    cache.batch_repeat_interleave(2)
    assert cache.slot_mask(0).tolist() == [[True, False, True]] * 2 + [[True, True, False]] * 2
    assert cache.layers[0].keys.shape[0] == 4


def test_reordering_rows_reorders_their_slot_records() -> None:
    # Beam search's reorder: new row 0 is old row 1 (T, T, F), new rows 1 and 2 are old row 0 (T, F, T).
    cache = record_two_rows()
    cache.extend_slots(1, None, 3, 2)  # a layer whose slots are all real keeps no record (None)
    cache.reorder_cache(torch.tensor([1, 0, 0]))
    assert cache.slot_mask(0).tolist() == [[True, True, False], [True, False, True], [True, False, True]]


def test_a_static_cache_has_no_slot_mask_for_a_dense_layer() -> None:
    cache = as_routed_cache(StaticCache(config=tiny_llama(num_layers=2).config, max_cache_len=4))
    assert cache.slot_mask(0) is None


def dense_and_routed_cache() -> RoutedCache:
    """Layer 0 dense with 5 tokens; layer 1 routed with 4 slots, recorded as (T, F, T, T) in its one row."""
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)
    cache.extend_slots(1, torch.tensor([True, False, True, True]).view(1, 1, 1, 4), 4, 1)
    cache.update(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), 1)
    return cache


def test_crop_by_a_count_crops_the_slot_records_too() -> None:
    cache = dense_and_routed_cache()
    cache.crop(0)  # transformers 5.25: remove no token (what assisted decoding asks when every draft is accepted)
    assert cache.slot_mask(1).tolist() == [[True, False, True, True]] and cache.get_seq_length() == 5
    cache.crop(-2)  # the last 2 tokens: 3 tokens in layer 0, 2 slots in layer 1
    assert cache.slot_mask(1).tolist() == [[True, False]] and cache.get_seq_length() == 3


@pytest.mark.parametrize(("keep", "length", "record"), [(5, 5, [True, False, True, True]), (7, 5, [True, False, True,
    True]), (3, 3, [True, False]), (0, 0, [])])  # fmt: skip
def test_crop_to_a_length_before_transformers_5_24(
    monkeypatch: pytest.MonkeyPatch, keep: int, length: int, record: list[bool]
) -> None:
    # Before 5.24 crop(n >= 0) keeps n tokens (measured on the dense layer 0, 5 tokens): 5 or more keeps everything,
    # 3 removes 2 tokens (the routed layer's last 2 slots too), 0 keeps nothing. The count this becomes is handed to
    # 5.25's crop, so the same arithmetic runs here with the version flag set as on 5.5 to 5.23.
    monkeypatch.setattr("pmod.core.cache.CROP_TAKES_COUNT", False)
    cache = dense_and_routed_cache()
    cache.crop(keep)
    assert cache.get_seq_length() == length and cache.slot_mask(1).tolist() == [record]


def test_the_slot_mask_of_a_layer_whose_slots_are_all_real() -> None:
    # 2 rows, 3 KV heads, 4 slots, dim 5: a bool [rows, slots] mask, all True (the record is None).
    cache = as_routed_cache(DynamicCache())
    cache.extend_slots(0, None, 4, 2)
    cache.update(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5), 0)
    mask = cache.slot_mask(0)
    assert mask.dtype == torch.bool and mask.tolist() == [[True] * 4] * 2


def test_a_layer_that_keeps_every_token_records_every_token() -> None:
    # No vision token in the batch: each routed layer's rule decides, and the plan keeps every token of both rows.
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5])).eval()
    ids = torch.arange(1, 11).view(2, 5)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, vision_mask=torch.zeros(2, 5, dtype=torch.bool))
    assert sorted(rec.processed) == [1, 2]
    for layer in (1, 2):
        assert rec.processed[layer][0].shape == (2, 5) and rec.processed[layer][0].all()


def test_m_rope_cos_sin_with_their_axis_are_gathered_at_the_kept_positions() -> None:
    # Qwen2-VL's layout up to transformers ~5.15: cos/sin [3, B, T, d] (one table per M-RoPE axis). Row 0 keeps
    # positions 0, 2, 4, row 1 keeps 1, 3 and a filler at 0: every axis's table gathered there, per row.
    config = PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5])
    layer = pmod.routed_layers(pmod.convert(tiny_llama(num_layers=3), config))[1]
    cos, sin = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    index = torch.tensor([[0, 2, 4], [1, 3, 0]])
    selection = Selection(index.view(2, 3, 1), torch.tensor([[True] * 3, [True, True, False]]).view(2, 3, 1), 3, 5)
    got_cos, got_sin = layer._gathered_rope((cos, sin), selection, ForwardPlan(None), False, None)
    for table, got in ((cos, got_cos), (sin, got_sin)):
        assert got.shape == (3, 2, 3, 4)
        for row in range(2):
            assert torch.equal(got[:, row], table[:, row, index[row]])
    renumbered, _ = layer._gathered_rope((cos, sin), selection, ForwardPlan(None), True, None)
    assert torch.equal(renumbered, cos[:, :, :3])  # positions 0..K-1 in every row


def test_two_rope_tables_in_one_forward_are_gathered_each_from_its_own() -> None:
    # The plan shares the batch-expanded table per table object: a second table [1, T, d] in the same forward
    # (another layer's RoPE) must not get the first one's expansion.
    config = PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5])
    layer = pmod.routed_layers(pmod.convert(tiny_llama(num_layers=3), config))[1]
    plan, index = ForwardPlan(None), torch.tensor([[0, 2], [1, 3]])
    selection = Selection(index.view(2, 2, 1), None, 2, 4)
    tables = [torch.randn(1, 4, 3), torch.randn(1, 4, 3)]  # both alive: distinct ids
    for cos in tables:
        got, _ = layer._gathered_rope((cos, cos), selection, plan, False, None)
        assert torch.equal(got, torch.stack([cos[0, index[0]], cos[0, index[1]]]))


def test_routing_inputs_without_a_plan_plan_over_their_token_mask() -> None:
    # A layer called on its own gets RoutingInputs without a plan: the plan it makes must see the padding.
    real = torch.tensor([[False, True, True]])
    assert RoutingInputs(token_mask=real).plan.token_valid()[0, 0, 0].tolist() == [False, True, True]


def test_set_attention_path_defaults_to_auto() -> None:
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5]))
    pmod.set_attention_path(model, "padded")
    pmod.set_attention_path(model)
    assert [layer.attention_path for layer in pmod.routed_layers(model).values()] == ["auto", "auto"]


ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (6, 17, False)]  # unequal vision counts: unequal kept rows
RATIOS = [None, 0.9, 0.5, 0.25, 0.15, 0.5]


@pytest.fixture
def packed_calls(packed_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """conftest's counter of packed attention calls, with the routed layers told the varlen kernel runs (as on CUDA
    in bf16), while the attention itself still runs per row on the CPU."""
    monkeypatch.setattr(routed_layer, "varlen_flash_available", lambda t: True)
    return packed_calls


def routed_llama() -> torch.nn.Module:
    model = pmod.convert(tiny_llama(num_layers=6), PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    return model


def test_auto_packs_only_without_gradients_and_padded_never(packed_calls: list[int]) -> None:
    model = routed_llama()
    ids, am, vm = routed_batch(ROWS, "left")
    with torch.no_grad():
        pmod.set_attention_path(model, "padded")(input_ids=ids, attention_mask=am, vision_mask=vm)
    assert packed_calls[0] == 0
    pmod.set_attention_path(model, "auto")(input_ids=ids, attention_mask=am, vision_mask=vm)  # autograd on
    assert packed_calls[0] == 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    assert packed_calls[0] == 5  # every routed layer: its rows keep unequal counts


def test_a_chunk_after_a_cached_token_is_never_packed(packed_calls: list[int]) -> None:
    # One cached token per row, then a chunk with unequal vision counts: the layers hold one slot already, so even
    # the forced packed path must attend over the cache (padded), giving what the padded path gives.
    model = routed_llama()
    ids = torch.randint(5, 100, (2, 9))
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[0, 1:3], vision[1, 1:7] = True, True  # 2 and 6 vision tokens
    logits = {}
    for path in ("padded", "packed"):
        pmod.set_attention_path(model, path)
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :1], **cache_kwargs(cache), use_cache=True)
            logits[path] = model(input_ids=ids[:, 1:], vision_mask=vision, **cache_kwargs(cache), use_cache=True).logits
    assert packed_calls[0] == 0
    torch.testing.assert_close(logits["packed"], logits["padded"], rtol=0, atol=0)


def test_padding_passes_a_string_layer_unchanged_and_is_never_vision() -> None:
    # "padding: unchanged" (STRing scales only skipped vision tokens); a vision mask that also marks padding
    # changes nothing, since padding is not a token.
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, None]))
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(5, 8, False), (3, 4, False)], "left")
    pad = ~am.bool()
    ids[pad] = 7  # a pad id with a non-zero embedding: id 0's is zero, and a Llama layer maps zeros to zeros
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, vision_mask=vm, output_hidden_states=True)
        marked = model(input_ids=ids, attention_mask=am, vision_mask=vm | pad, output_hidden_states=True)
        text_only = model(input_ids=ids, attention_mask=am)  # no routing decision: the dense model
        dense = tiny_llama(num_layers=3)(input_ids=ids, attention_mask=am)
    before, after = out.hidden_states[1], out.hidden_states[2]  # into and out of the routed layer 1
    assert bool(pad.any())
    torch.testing.assert_close(after[pad], before[pad], rtol=0, atol=0)
    torch.testing.assert_close(text_only.logits[~pad], dense.logits[~pad], rtol=0, atol=1e-6)
    torch.testing.assert_close(marked.logits[~pad], out.logits[~pad], rtol=0, atol=0)
    torch.testing.assert_close(marked.hidden_states[2][pad], marked.hidden_states[1][pad], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["padded", "packed", "static"])
def test_extra_attention_keywords_reach_the_attention_of_routed_layers(path: str) -> None:
    """On the padded and packed paths, and over a static cache (its own branch of the compacted block)."""
    seen: dict[int, object] = {}

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = kwargs.get("pmod_probe")
        kwargs.pop("pmod_probe", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = routed_llama()
    pmod.set_attention_path(model, "padded" if path == "static" else path)
    ids, am, vm = routed_batch(ROWS, "left")
    static = StaticCache(config=model.config, max_cache_len=ids.shape[1])
    cache = {**cache_kwargs(static), "use_cache": True} if path == "static" else {}
    AttentionInterface.register("sdpa", recording_sdpa)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, vision_mask=vm, pmod_probe="here", **cache)
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)
    assert seen == dict.fromkeys(range(6), "here")


def direct_layer(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = pmod.convert(tiny_llama(num_layers=2).to(dtype), PModConfig(schedule="explicit", ratios=[None, 0.15]))
    randomize_routers(model, scale=3.0)
    return model, model.model.layers[1]


def test_a_layer_called_without_routing_inputs_is_the_plain_decoder_layer() -> None:
    # No routing inputs (a caller outside pmod's model hook): every token is processed, as transformers' own
    # LlamaDecoderLayer.forward computes it.
    model, layer = direct_layer()
    hidden = torch.randn(2, 4, model.config.hidden_size)
    pos = model.model.rotary_emb(hidden, torch.arange(4)[None])
    with torch.no_grad():
        got = layer(hidden, position_embeddings=pos)
        want = type(layer).__mro__[2].forward(layer, hidden, position_embeddings=pos)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_where_no_token_runs_is_only_rescaled(dtype: torch.dtype) -> None:
    # 3 vision tokens at ratio 0.15 keep floor(0.45) = 0: nothing runs; with STRing every (skipped) token becomes
    # w~ x, w~ = 0.2 tanh(router logit) + 1 (TanhNorm with the paper's 0.2 and 1.0), in the layer's dtype.
    model, layer = direct_layer(dtype)
    hidden = torch.randn(1, 3, model.config.hidden_size).to(dtype)
    pos = model.model.rotary_emb(hidden, torch.arange(3)[None])
    vision = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        got = layer(hidden, position_embeddings=pos, routing=RoutingInputs(vision_mask=vision))
        logit = (hidden.float() @ layer.router.weight.float().T + layer.router.bias.float()).squeeze(-1)
    weight = 0.2 * torch.tanh(logit) + 1.0
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), hidden.float() * weight[..., None], rtol=1e-2, atol=1e-2)
    assert not torch.equal(got, hidden)


def test_routed_class_is_made_once_per_layer_class() -> None:
    class FreshDecoderLayer(LlamaDecoderLayer):  # a new class object on every call: never converted before
        pass

    cls = routed_layer.routed_layer_class(FreshDecoderLayer)
    assert cls is routed_layer.routed_layer_class(FreshDecoderLayer)
    assert cls.__mro__[1:3] == (routed_layer.RoutedLayerMixin, FreshDecoderLayer)
    assert cls.__name__ == cls.__qualname__ == "RoutedFreshDecoderLayer"
    assert cls.__module__ == "pmod.core.routed_layer"
    assert routed_layer.RoutedFreshDecoderLayer is cls  # importable by name (pickle, deepcopy)


def test_a_layer_without_the_llama_submodules_is_refused_and_new_layers_start_on_auto() -> None:
    with pytest.raises(TypeError, match=r"Linear lacks \['input_layernorm', 'self_attn'"):
        routed_layer.make_routed_layer(torch.nn.Linear(2, 2), 0, routed_layer.RoutingRule())
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5]))
    assert [layer.attention_path for layer in pmod.routed_layers(model).values()] == ["auto", "auto"]


def test_a_static_prefill_of_one_row_has_no_filler_slots() -> None:
    # One row: each routed layer keeps 4 text + floor(8 * 0.5) = 4 vision tokens, 8 slots and no filler (the
    # selection has no validity mask). The static cache's prefill gives the dynamic cache's logits and records the
    # 8 slots written, the other 4 of the 12 not.
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5]))
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(4, 8, False)], "left")
    static = StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(static), use_cache=True)
        want = model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    assert [static.slot_mask(i).tolist() for i in (1, 2)] == [[[True] * 8 + [False] * 4]] * 2


def test_position_ids_reach_the_attention_only_where_every_token_runs() -> None:
    # Flash attention's varlen path reads position_ids (a restart at 0 begins a new sequence): a layer that runs every
    # token passes the model's on, a compacted layer none (its slots' positions would read as packed sequences).
    seen: dict[int, object] = {}

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        ids = kwargs.get("position_ids")
        seen[module.layer_idx] = (None if ids is None else ids.tolist(), kwargs.pop("pmod_probe", None))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = routed_llama()
    ids, positions = torch.arange(10, 16)[None], [list(range(3, 9))]
    AttentionInterface.register("sdpa", recording_sdpa)
    try:
        with torch.no_grad():
            for vision in (torch.zeros(1, 6, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)):
                text_only = dict(seen)
                seen.clear()
                model(input_ids=ids, position_ids=torch.tensor(positions), vision_mask=vision, pmod_probe="here")
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)
    # no vision token: every layer runs every token (with the extra keyword too)
    assert text_only == dict.fromkeys(range(6), (positions, "here"))
    # all vision: layer 0 is dense; the others keep 5, 3, 1, 0 and 3 of 6 (layer 4 runs none: no attention call)
    compacted = (None, "here")
    assert seen == {0: (positions, "here"), 1: compacted, 2: compacted, 3: compacted, 5: compacted}


def test_a_routed_layer_takes_its_old_routing_keyword() -> None:
    # pmod <= 0.2 called it pmod_routing: the same routing (half of the 4 vision tokens skip), with a warning.
    model = pmod.convert(tiny_llama(num_layers=2), PModConfig(schedule="explicit", ratios=[None, 0.5]))
    randomize_routers(model, scale=3.0)
    layer, hidden = model.model.layers[1], torch.randn(1, 4, 64)
    pos = model.model.rotary_emb(hidden, torch.arange(4)[None])
    routing = RoutingInputs(vision_mask=torch.ones(1, 4, dtype=torch.bool))
    with torch.no_grad():
        new = layer(hidden, position_embeddings=pos, routing=routing)
        message = "the pmod_routing keyword of a routed layer is deprecated and will be removed in the next release"
        with pytest.warns(DeprecationWarning, match=message + "; use routing."):
            old = layer(hidden, position_embeddings=pos, pmod_routing=routing)
        unrouted = layer(hidden, position_embeddings=pos)
    assert torch.equal(old, new) and not torch.equal(new, unrouted)


def test_the_packed_kernel_gets_the_longest_rows_length(monkeypatch: pytest.MonkeyPatch) -> None:
    # varlen flash attention sizes its work by max_len, the longest packed row (no CPU path reads it, so it is
    # recorded here). p-MoD keeps text + floor(vision * ratio) per row of ROWS (text, vision): ratio 0.9: 5 + 20,
    # 9 + 9, 4 + 0, 6 + 15 -> 25; 0.5: 16, 14, 4, 14 -> 16; 0.25: 10, 11, 4, 10 -> 11; 0.15: 8, 10, 4, 8 -> 10.
    seen = []
    inner = packed_attention.packed_causal_attention

    def recorded(query, key, value, cu_seqlens, max_len, **options):  # noqa: ANN001, ANN003, ANN202
        seen.append(max_len)
        return inner(query, key, value, cu_seqlens, max_len, **options)

    monkeypatch.setattr(packed_attention, "packed_causal_attention", recorded)
    model = pmod.set_attention_path(routed_llama(), "packed")
    ids, am, vm = routed_batch(ROWS, "left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    assert seen == [25, 16, 11, 10, 16]


def test_slot_records_are_made_on_the_device_of_the_cache() -> None:
    # The meta device stands in for a GPU: a record made on the default device (the CPU) would sit on another device
    # than the keys it describes. Layer 1 first caches 2 real slots (no record), then 1 slot recorded, then 1 real.
    meta = torch.device("meta")
    cache = as_routed_cache(DynamicCache())
    kv = torch.zeros(2, 1, 2, 2, device=meta)
    cache.update(kv, kv, 0)
    cache.extend_slots(1, None, 2, 2)
    cache.update(kv, kv, 1)
    assert cache.slot_mask(1).device == meta and cache.slot_mask(1).shape == (2, 2)
    before, after = cache.extend_slots(1, torch.ones(2, 1, 1, 1, dtype=torch.bool, device=meta), 1, 2)
    assert before.device == after.device == meta and after.shape == (2, 1, 1, 3)
    cache.update(kv[:, :, :1], kv[:, :, :1], 1)
    _, after = cache.extend_slots(1, None, 1, 2)
    assert after.device == meta and after.shape == (2, 1, 1, 4)
    assert RoutingInputs().real_mask(torch.zeros(2, 3, 4, device=meta)).device == meta
