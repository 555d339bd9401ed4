"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core`` (see
``benchmarks/mutation/run_mutation.py`` and ``benchmarks/results/mutation.json``). Each expected value is computed by
hand in a comment next to it, never taken from the code under test."""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pmod
from pmod.core import deprecation, packed_attention
from pmod.core.compaction import build_attention_mask, compact_index, sdpa_without_cudnn
from pmod.core.deprecation import renamed_attributes
from pmod.core.packed_attention import (
    PackedCacheWriter,
    PackedSdpa,
    cumulative_lengths,
    packed_causal_attention,
    unpack_slots,
    varlen_flash_available,
)
from pmod.core.schedules import layer_set, linear_ratio, linear_schedule, prd_ratio, validate_schedule
from pmod.testing import randomize_routers, routed_batch, tiny_llama


def test_a_ratio_equal_to_max_ratio_is_dense() -> None:
    # linear, 3 layers, beta 0.5: R_1 = 0.5 - 1/2 + 0.5 = 0.5 exactly (= max_ratio, so dense: "at or above");
    # R_2 = 0.5 - 1 + 0.5 = 0.0, clamped to 0.15.
    assert linear_schedule(3, max_ratio=0.5) == [None, None, 0.15]


def test_default_beta_and_short_models() -> None:
    # beta defaults to 0.5 (the paper's): R_0 = 0.5 cos(0) + 0.5 = 1.0; linear R_1 of 3 = 0.5 - 1/2 + 0.5 = 0.5.
    assert prd_ratio(0, 3) == 1.0
    assert linear_ratio(1, 3) == 0.5
    # 2 layers use the formula: linear R_1 = 0.5 - 1/1 + 0.5 = 0.0; PRD R_1 = 0.5 cos(pi) + 0.5 = 0.0.
    assert linear_ratio(1, 2) == 0.0
    assert prd_ratio(1, 2) == pytest.approx(0.0, abs=1e-12)
    # 1 layer: the formula's l = 0 value, 0.5 * 1 + beta = 0.5 + 0.25.
    assert prd_ratio(0, 1, beta=0.25) == 0.75
    assert linear_ratio(0, 1, beta=0.25) == 0.75


def test_a_bool_is_not_a_ratio() -> None:
    with pytest.raises(ValueError, match=r"Retention ratio True for layer 1 is outside \(0, 1\]"):
        validate_schedule([None, True], 2)


def test_named_and_explicit_layer_sets() -> None:
    # 5 layers: "all" is every layer but 0; "deep_all" 2..L-2; "interleave" the odd ones.
    assert layer_set("all", 5) == [1, 2, 3, 4]
    assert layer_set("deep_all", 5) == [2, 3]
    assert layer_set("interleave", 5) == [1, 3]
    # explicit indices: sorted, duplicates dropped; 0 and L-1 are valid indices, L is not.
    assert layer_set([4, 0, 2, 2], 5) == [0, 2, 4]
    with pytest.raises(ValueError, match=r"Layer indices \[5\] are outside 0\.\.4"):
        layer_set([1, 5], 5)
    with pytest.raises(ValueError, match=r"Layer indices \[-1\] are outside 0\.\.4"):
        layer_set([-1, 1], 5)


def test_attention_masks_by_hand() -> None:
    valid = torch.tensor([[True, True, True]])
    # FlashAttention: no mask when every key is valid, else the 2-D key padding mask as int32.
    assert build_attention_mask(valid, None, "flash_attention_2", torch.float32) is None
    partial = torch.tensor([[True, True, False]])
    got = build_attention_mask(partial, None, "flash_attention_3", torch.float32)
    assert got.dtype == torch.int32 and got.tolist() == [[1, 1, 0]]
    # sdpa without padding: its own causal path (no mask), for a prefill (no past) and for one query over a past.
    assert build_attention_mask(valid, None, "sdpa", torch.float32) is None
    assert build_attention_mask(valid[:, :1], valid, "sdpa", torch.float32) is None
    # sdpa with padding: a bool mask, causal and without invalid keys, but a query always sees itself (the filler in
    # slot 2 sees the valid keys before it and itself).
    mask = build_attention_mask(partial, None, "sdpa", torch.float32)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[[[True, False, False], [True, True, False], [True, True, True]]]]
    # eager always needs the additive mask: causal, 0 where allowed, the dtype's minimum elsewhere.
    low = torch.finfo(torch.float32).min
    eager = build_attention_mask(valid, None, "eager", torch.float32)
    assert eager.tolist() == [[[[0.0, low, low], [0.0, 0.0, low], [0.0, 0.0, 0.0]]]]
    bf16 = build_attention_mask(valid, None, "eager", torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


def test_compact_index_by_hand() -> None:
    processed = torch.tensor([[True, False, True, False], [False, True, False, False]])
    # K = the largest count, 2: processed positions first in order, then the row's first unprocessed ones as filler.
    index, valid = compact_index(processed)
    assert index.tolist() == [[0, 2], [1, 0]] and valid.tolist() == [[True, True], [True, False]]
    index, valid = compact_index(processed, 3)
    assert index.tolist() == [[0, 2, 1], [1, 0, 2]] and valid.tolist() == [[True, True, False], [True, False, False]]


def test_no_sdpa_backend_left_but_cudnn_means_no_restriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda: False)
    assert isinstance(sdpa_without_cudnn(), contextlib.nullcontext)


# --- pmod.core.packed_attention ---------------------------------------------------------------------------------

#: Packed rows of 3, 1 and 2 tokens (6 in all), one query head and one key/value head of width 4.
ROW_VALID = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
ROW_BOUNDS = [0, 3, 4, 6]


def causal_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention within each row of ROW_BOUNDS, written out: [1, H, N, d] in and out."""
    out = torch.zeros_like(q)
    for a, b in zip(ROW_BOUNDS[:-1], ROW_BOUNDS[1:], strict=True):
        scores = q[0, :, a:b] @ k[0, :, a:b].transpose(-1, -2) * scale
        scores = scores.masked_fill(torch.ones(b - a, b - a).triu(1).bool(), float("-inf"))
        out[0, :, a:b] = scores.softmax(-1) @ v[0, :, a:b]
    return out


def qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 1, 6, 4, generator=g) for _ in range(3))  # type: ignore[return-value]


def test_cumulative_lengths_are_int32_for_the_varlen_kernel() -> None:
    # Rows of 3, 1 and 2 valid slots: [0, 3, 4, 6]; int32, the dtype varlen_attn's cu_seq_q/cu_seq_k take (an int64
    # cumsum would pass every CPU path, which reads the bounds with tolist(), and fail only on CUDA).
    cu = cumulative_lengths(ROW_VALID)
    assert cu.dtype == torch.int32 and cu.tolist() == ROW_BOUNDS


def test_packed_attention_takes_the_scale_and_the_dropout() -> None:
    q, k, v = qkv()
    cu = torch.tensor(ROW_BOUNDS, dtype=torch.int32)
    # scale 0.3, not the default 1/sqrt(4) = 0.5
    got = packed_causal_attention(q, k, v, cu, 3, scale=0.3)
    torch.testing.assert_close(got, causal_rows(q, k, v, 0.3), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, causal_rows(q, k, v, 0.5), atol=1e-3)
    # dropout 1.0 drops every attention weight: all zeros (without the dropout the output is not)
    assert torch.equal(packed_causal_attention(q, k, v, cu, 3, dropout_p=1.0), torch.zeros(1, 1, 6, 4))


def fake_varlen(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """The varlen flash kernel "available" on the CPU: a stand-in that records its call and returns zeros."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **options):  # noqa: ANN001, ANN003, ANN202
        calls.append((cu_q.tolist(), cu_k.tolist(), max_q, max_k, options))
        return torch.zeros_like(q)

    monkeypatch.setattr(packed_attention, "varlen_flash_available", lambda t: True)
    monkeypatch.setattr(packed_attention, "_varlen_attn", lambda: kernel)
    monkeypatch.setattr(packed_attention, "_varlen_takes", lambda: frozenset({"scale", "window_size"}))


def test_varlen_kernel_only_without_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    # varlen_attn has no dropout: with dropout_p = 0 the kernel runs (causal = window (-1, 0), the scale passed on,
    # the row bounds and the longest row, 3); with any dropout the per-row sdpa runs instead.
    calls: list = []
    fake_varlen(monkeypatch, calls)
    q, k, v = qkv()
    cu = torch.tensor(ROW_BOUNDS, dtype=torch.int32)
    assert torch.equal(packed_causal_attention(q, k, v, cu, 3, scale=0.3), torch.zeros(1, 1, 6, 4))
    assert calls == [(ROW_BOUNDS, ROW_BOUNDS, 3, 3, {"window_size": (-1, 0), "scale": 0.3})]
    calls.clear()
    assert torch.equal(packed_causal_attention(q, k, v, cu, 3, dropout_p=1.0), torch.zeros(1, 1, 6, 4))
    packed_causal_attention(q, k, v, cu, 3, dropout_p=0.5)
    assert calls == []
    # PackedSdpa hands the kernel its max_len (5 here, as given; not None)
    with PackedSdpa(cu, 5, 6):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert [c[2:4] for c in calls] == [(5, 5)]


def test_varlen_flash_needs_cuda_half_precision_and_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    # Stand-ins for a tensor: the rule reads only is_cuda and dtype (a CPU cannot make a CUDA tensor).
    monkeypatch.setattr(packed_attention, "_varlen_attn", lambda: object())
    assert varlen_flash_available(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))
    assert varlen_flash_available(SimpleNamespace(is_cuda=True, dtype=torch.float16))
    assert not varlen_flash_available(SimpleNamespace(is_cuda=True, dtype=torch.float32))
    assert not varlen_flash_available(SimpleNamespace(is_cuda=False, dtype=torch.bfloat16))
    monkeypatch.setattr(packed_attention, "_varlen_attn", lambda: None)  # torch < 2.10
    assert not varlen_flash_available(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16))


def test_packed_sdpa_passes_scale_and_dropout_given_by_name_or_position() -> None:
    q, k, v = qkv()
    cu = torch.tensor(ROW_BOUNDS, dtype=torch.int32)
    with PackedSdpa(cu, 3, 6):
        by_name = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, dropout_p=0.0)
        default = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # dropout_p not given: none
        positional = F.scaled_dot_product_attention(q, k, v, None, 0.0, True)
        dropped = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=1.0)
        dropped_positional = F.scaled_dot_product_attention(q, k, v, None, 1.0, True)
    torch.testing.assert_close(by_name, causal_rows(q, k, v, 0.3), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(default, causal_rows(q, k, v, 0.5), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(positional, causal_rows(q, k, v, 0.5), atol=1e-6, rtol=1e-5)
    assert torch.equal(dropped, torch.zeros(1, 1, 6, 4)) and torch.equal(dropped_positional, torch.zeros(1, 1, 6, 4))


def test_packed_sdpa_refuses_every_call_it_does_not_know() -> None:
    q, k, v = qkv()
    cu = torch.tensor(ROW_BOUNDS, dtype=torch.int32)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    calls = [
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=False),  # not causal
        lambda: F.scaled_dot_product_attention(q, k, v),  # is_causal not given: not causal
        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True),  # a mask
        lambda: F.scaled_dot_product_attention(q, k, v, mask, 0.0, True),  # a mask given by position
        lambda: F.scaled_dot_product_attention(q[..., :5, :], k, v, is_causal=True),  # 5 queries, not the 6 packed
        # sdpa's length is the second-to-last axis whatever the rank: [H, L, E] with L = 4, E = 6 packed tokens
        lambda: F.scaled_dot_product_attention(*torch.randn(3, 1, 4, 6), is_causal=True),
    ]
    for call in calls:
        with PackedSdpa(cu, 3, 6), pytest.raises(RuntimeError, match="packed attention expected a causal, mask-free"):
            call()


def test_unpack_slots_casts_to_the_fillers_dtype() -> None:
    # fp32 packed values [1, 3, 1] into a bf16 [2, 2, 1] filler at flat slots 0, 1, 2: rounded to bf16 (1/3 ->
    # 0.333984375, 8 significant bits), slot 3 keeps the filler's 7.
    packed = torch.tensor([[[1 / 3], [2.0], [-1.0]]])
    filler = torch.full((2, 2, 1), 7.0, dtype=torch.bfloat16)
    got = unpack_slots(packed, torch.tensor([0, 1, 2]), filler)
    assert got.dtype == torch.bfloat16 and got.flatten().tolist() == [0.333984375, 2.0, -1.0, 7.0]


class RecordingCache:
    """A cache that records what it is given and has one attribute of its own."""

    seen_tokens = 11

    def __init__(self) -> None:
        self.calls: list = []

    def update(self, key, value, layer_idx, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        self.calls.append((key, value, layer_idx, args, kwargs))
        return key, value


def test_packed_cache_writer_stores_the_padded_layout_and_passes_everything_on() -> None:
    # Rows of 3, 1 and 2 valid slots of 3: packed tokens 0..5 sit at flat slots 0, 1, 2 | 3 | 6, 7.
    cache = RecordingCache()
    writer = PackedCacheWriter(cache, ROW_VALID, torch.tensor([0, 1, 2, 3, 6, 7]))
    key = torch.arange(1.0, 7.0).view(1, 1, 6, 1)  # [1, Hkv=1, N=6, d=1], token t holds t + 1
    got = writer.update(key, -key, 4, {"cache_position": "p"}, extra=1)
    assert got[0] is key  # attention gets the packed keys
    stored_key, stored_value, layer_idx, args, kwargs = cache.calls[0]
    assert stored_key.shape == (3, 1, 3, 1)  # [B, Hkv, K, d]
    assert stored_key.flatten().tolist() == [1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 6.0, 0.0]  # filler slots zero
    assert torch.equal(stored_value, -stored_key)
    assert (layer_idx, args, kwargs) == (4, ({"cache_position": "p"},), {"extra": 1})
    # anything else the attention module asks of its cache is the cache's own
    assert writer.seen_tokens == 11


def test_renamed_attributes_resolve_to_the_new_name_with_a_warning_at_the_caller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # warnings.warn is recorded rather than caught: the stack level is read as the argument it is (3: the line that
    # used the old name, above __getattr__ and warn_renamed), since mutmut's trampolines add frames of their own.
    warned = []
    monkeypatch.setattr(deprecation.warnings, "warn", lambda *args, **kwargs: warned.append((args, kwargs)))
    module = ModuleType("renamed_example")
    module.new_name = object()
    module.__getattr__ = renamed_attributes("renamed_example", {"old_name": "new_name"})  # PEP 562
    monkeypatch.setitem(sys.modules, "renamed_example", module)
    assert module.old_name is module.new_name
    message = "renamed_example.old_name is deprecated and will be removed in the next release; use renamed_example."
    assert warned == [((message + "new_name.", DeprecationWarning), {"stacklevel": 3})]
    with pytest.raises(AttributeError, match="module 'renamed_example' has no attribute 'other_name'"):
        module.other_name  # noqa: B018


def test_a_forward_from_embeddings_routes_as_one_from_token_ids() -> None:
    # The hook reads the batch size, length and device from inputs_embeds when no input_ids are given (with and
    # without a vision mask): the same logits as from the ids.
    model = pmod.convert(tiny_llama(num_layers=3), pmod.PModConfig(schedule="explicit", ratios=[None, 0.5, 0.25]))
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(4, 8, False), (6, 3, True)], "left")
    embeds = model.model.embed_tokens(ids)
    with torch.no_grad():
        for vision in ({"vision_mask": vm}, {}):
            want = model(input_ids=ids, attention_mask=am, **vision).logits
            got = model(inputs_embeds=embeds, attention_mask=am, **vision).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_prompt_question_mask_says_nothing_about_a_decode_step() -> None:
    """generate() passes the prompt's question_mask again at every decode step; it describes the prompt only. A decode
    step given it must run as one given none: with every token's p = softmax([1, -1])[1] = 0.12 below the 0.5 decode
    threshold, the new token is skipped by every gamma-MoD layer, also when the prompt's last token is a question
    token (slicing the prompt's mask to the step would mark it as question, so processed)."""
    import copy

    from pmod.methods import GammaMoDConfig
    from pmod.methods.gamma_mod import ROUTER_NAME
    from pmod.testing import llava_batch, tiny_llava

    model = pmod.convert(tiny_llava(num_layers=4), GammaMoDConfig(layers=[1, 2, 3]))
    router = getattr(pmod.core.backbone.backbone_for(model).decoder(model), ROUTER_NAME)
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(torch.tensor([1.0, -1.0]))
    batch = llava_batch(model, [(3, 5)], [True])
    question = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    question[:, -3:] = True  # the prompt ends with its question
    with torch.no_grad():
        prompt = model(**batch, question_mask=question, use_cache=True)
        step = {"input_ids": torch.tensor([[7]]), "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 1,
                                                                                dtype=torch.long)}  # fmt: skip
        given = model(**step, past_key_values=copy.deepcopy(prompt.past_key_values), question_mask=question)
        alone = model(**step, past_key_values=copy.deepcopy(prompt.past_key_values))
    torch.testing.assert_close(given.logits, alone.logits, rtol=0, atol=0)


def test_a_one_token_chunk_without_images_is_text_even_as_the_image_id() -> None:
    """A decode step without images is text, known without reading its id on the host: even a generated image
    placeholder id runs as a text token (as with an explicit all-False vision_mask), not as a vision token that a
    p-MoD layer at ratio 0.5 would skip (floor(0.5 * 1) = 0 kept)."""
    import copy

    from pmod.methods import PModConfig
    from pmod.testing import IMAGE_TOKEN_ID, llava_batch, tiny_llava

    model = pmod.convert(tiny_llava(num_layers=4), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5, 0.5]))
    randomize_routers(model)
    batch = llava_batch(model, [(3, 5)], [True])
    with torch.no_grad():
        prompt = model(**batch, use_cache=True)
        step = {"input_ids": torch.tensor([[IMAGE_TOKEN_ID]]),
                "attention_mask": torch.ones(1, batch["input_ids"].shape[1] + 1, dtype=torch.long)}  # fmt: skip
        plain = model(**step, past_key_values=copy.deepcopy(prompt.past_key_values))
        text = model(**step, past_key_values=copy.deepcopy(prompt.past_key_values),
                     vision_mask=torch.zeros(1, 1, dtype=torch.bool))  # fmt: skip
    torch.testing.assert_close(plain.logits, text.logits, rtol=0, atol=0)
