"""Tests written to kill the mutants that survived the rest of the suite in the FLOPs/KV accounting
(``pmod.analysis.analytic_flops``, ``pmod.analysis.dims``; see ``benchmarks/mutation/run_mutation.py``). Expected
values are worked out by hand in the comments, never read back from the code under test."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from pmod import PModConfig
from pmod.analysis.analytic_flops import (
    FlopsReport,
    LayerCost,
    LMDims,
    counted_flops,
    estimate,
    layer_cost,
    method_config_from,
)
from pmod.analysis.dims import bytes_per_element, presets, vision_tokens, weight_dtype
from pmod.core.config import LayerPlan

TOY = LMDims(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
TOY_PMOD = PModConfig(schedule="explicit", ratios=[None, 0.5])


def toy_layer(index: int, ratio: float | None, kept: int, k: int, router: int, decode: int) -> dict:
    """One layer of the toy model (hidden 8, 2 heads of 4, 1 KV head, MLP 16) on K tokens, by hand."""
    return {
        "index": index,
        "ratio": ratio,
        "kept_vision": kept,
        "processed": k,
        "attn_proj": 2 * k * 8 * 24,  # q 8, k 4, v 4, o 8 wide
        "attn_scores": 2 * 2 * k * k * 4,
        "attn_values": 2 * 2 * k * k * 4,
        "mlp": 3 * 2 * k * 8 * 16,
        "router": router,
        "kv_bytes": 2 * k * 1 * 4 * 2,  # K and V, 1 KV head of 4, fp16
        "decode": decode,
        "scoring": 0,
        "flops": 2 * k * 8 * 24 + 2 * (2 * 2 * k * k * 4) + 3 * 2 * k * 8 * 16 + router,
    }


def test_the_json_summary_holds_every_key_with_hand_values() -> None:
    # 4 vision + 2 text tokens, layer 0 dense (K = 6), layer 1 keeps floor(0.5 * 4) = 2 vision tokens (K = 4).
    dense0 = toy_layer(0, None, 4, 6, 0, 1376)  # decode: 384 + 768 + 2*2*2*4*(6+1)
    dense1 = {**dense0, "index": 1}
    routed1 = toy_layer(1, 0.5, 2, 4, 2 * 6 * 8, 1328)  # router Linear(8, 1) on 6 tokens; decode 1152+160+16
    expected = {
        "dense_tflops": 17088 / 1e12,
        "pmod_tflops": 14240 / 1e12,
        "tflops_ratio": 14240 / 17088,
        "dense_kv_bytes": 192,
        "pmod_kv_bytes": 160,
        "kv_cache_ratio": 160 / 192,
        "mean_retention": 0.75,
        "includes_lm_head": True,
        "dense_flops": 17088,
        "pmod_flops": 14240,
        "lm_head_flops": 960,
        "pmod_lm_head_flops": 960,  # a routed-layer method runs the head on every token (VisionZip: fewer)
        "dense_flops_without_lm_head": 16128,
        "pmod_flops_without_lm_head": 13280,
        "tflops_ratio_without_lm_head": 13280 / 16128,
        "dense_decode_flops": 2912,
        "pmod_decode_flops": 2864,
        "decode_flops_ratio": 2864 / 2912,
        "lm_head_decode_flops": 160,
        "n_vision": 4,
        "n_text": 2,
        "batch_size": 1,
        "bytes_per_element": 2,
        "dims": {"hidden": 8, "layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 4, "intermediate": 16, "vocab": 10},
        "method": "pmod",
        "method_config": dataclasses.asdict(TOY_PMOD),
        "schedule": [None, 0.5],
        "layers": [dense0, routed1],
        "dense_layers": [dense0, dense1],
    }
    got = estimate(TOY, TOY_PMOD, n_vision=4, n_text=2).to_dict()
    assert got == expected  # the ratios are the same one division as in the code, so exact
    assert list(got) == list(expected)


def test_batch_size_and_element_size_reach_the_report() -> None:
    # batch 3, fp32: KV bytes scale by 3 * 4 / 2 = 6 over the batch-1 fp16 values (192, 160).
    r = estimate(TOY, TOY_PMOD, n_vision=4, n_text=2, batch_size=3, dtype="float32").to_dict()
    assert (r["batch_size"], r["bytes_per_element"]) == (3, 4)
    assert (r["dense_kv_bytes"], r["pmod_kv_bytes"]) == (1152, 960)
    assert [layer["index"] for layer in r["layers"]] == [0, 1]


def test_a_ratio_given_as_a_float_is_a_one_output_router() -> None:
    # layer_cost with a bare ratio: p-MoD's Linear(hidden, 1) router on all 6 tokens, floor(0.5 * 4) = 2 kept.
    cost = layer_cost(TOY, 3, 0.5, n_vision=4, n_text=2, batch_size=1, elem_bytes=2)
    assert (cost.index, cost.ratio, cost.kept_vision, cost.processed, cost.router) == (3, 0.5, 2, 4, 96)
    dense = layer_cost(TOY, 0, None, n_vision=4, n_text=2, batch_size=1, elem_bytes=2)
    assert (dense.ratio, dense.kept_vision, dense.processed, dense.router) == (None, 4, 6, 0)


def test_question_tokens_matter_only_to_a_plan_that_routes_text() -> None:
    # 10 vision + 6 text tokens, 2 of them the question. Vision-only routing: 10 routable, 5 kept, K = 6 + 5.
    vision_only = layer_cost(TOY, 1, LayerPlan(ratio=0.5, router_outputs=1), 10, 6, 1, 2, n_question=2)
    assert (vision_only.kept_vision, vision_only.processed) == (5, 11)
    # Text routed too (gamma-MoD): 10 + (6 - 2) = 14 routable, 7 kept, K = 16 - 14 + 7 = 9.
    text_too = layer_cost(TOY, 1, LayerPlan(ratio=0.5, router_outputs=2, routes_text=True), 10, 6, 1, 2, n_question=2)
    assert (text_too.kept_vision, text_too.processed) == (7, 9)


def test_token_count_checks() -> None:
    # Text-only and vision-only prompts are valid; no token at all, or a negative count, is not.
    assert estimate(TOY, TOY_PMOD, n_vision=4, n_text=0).routed_layers[1].processed == 2
    assert estimate(TOY, TOY_PMOD, n_vision=0, n_text=3).routed_layers[1].processed == 3
    assert estimate(TOY, TOY_PMOD, n_vision=1, n_text=0).dense_layers[0].processed == 1
    assert estimate(TOY, TOY_PMOD, n_vision=2, n_text=2).dense_layers[0].processed == 4
    for n_vision, n_text in ((0, 0), (-1, 2), (2, -1), (-1, -1)):
        with pytest.raises(ValueError, match="Token counts must be >= 0 and not both 0"):
            estimate(TOY, TOY_PMOD, n_vision=n_vision, n_text=n_text)


def test_empty_report_ratios_are_nan() -> None:
    # No layers and no head: 0 / 0 is "not a number", not an error.
    r = FlopsReport(TOY, TOY_PMOD, 0, 0, 1, 2, [], [], 0, 0, schedule=[None])
    assert math.isnan(r.tflops_ratio) and math.isnan(r.kv_cache_ratio)
    assert math.isnan(r.to_dict()["decode_flops_ratio"])


def stored_config(inner: dict) -> dict:
    return {"model_type": "llava", "text_config": inner}


def test_stored_method_settings_are_found_in_text_config_and_any_mapping() -> None:
    settings = {"method": "pmod", "settings": {"schedule": "constant", "ratio": 0.25}}
    found = method_config_from(stored_config({"pmod_method": settings}))
    assert (found.schedule, found.ratio) == ("constant", 0.25)
    top = method_config_from(types.MappingProxyType({"pmod_method": settings}))  # a Mapping that is not a dict
    assert (top.schedule, top.ratio) == ("constant", 0.25)
    as_object = method_config_from(types.SimpleNamespace(text_config=types.SimpleNamespace(pmod_method=settings)))
    assert as_object.ratio == 0.25
    assert method_config_from({"model_type": "llama"}) is None


def test_estimate_takes_the_method_stored_in_the_config() -> None:
    config = {
        "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 4, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "intermediate_size": 16, "vocab_size": 10,
        "pmod_method": {"method": "pmod", "settings": {"schedule": "constant", "ratio": 0.25}},
    }  # fmt: skip
    # constant 0.25 on layers 1..3 (not the PRD default): floor(0.25 * 8) = 2 vision tokens kept there.
    r = estimate(config, n_vision=8, n_text=2)
    assert r.schedule == [None, 0.25, 0.25, 0.25]
    assert [c.processed for c in r.routed_layers] == [10, 4, 4, 4]


class FakeCounter:
    """What counted_flops reads of a FlopCounterMode: per-module counts and the total."""

    def get_flop_counts(self) -> dict:
        return {
            "Global": {"mm": 110},
            "model.rotary_emb": {"mm": 7, "bmm": 3},
            "model.layers.0.self_attn": {"mm": 100},
        }

    def get_total_flops(self) -> int:
        return 110


def test_rotary_tables_are_left_out_of_counted_flops() -> None:
    # 110 counted in all, of which 7 + 3 build the rotary tables: 100 remain.
    assert counted_flops(FakeCounter()) == 100


def test_layer_cost_dict_adds_the_total() -> None:
    cost = LayerCost(index=1, ratio=0.5, kept_vision=2, processed=4, attn_proj=1, attn_scores=2, attn_values=3,
                     mlp=4, router=5, kv_bytes=6, decode=7, scoring=8)  # fmt: skip
    assert cost.to_dict()["flops"] == 1 + 2 + 3 + 4 + 5 + 8


def test_bytes_per_element_names_and_dtypes() -> None:
    assert bytes_per_element("torch.bfloat16") == 2 and bytes_per_element("FP32") == 4
    assert bytes_per_element(torch.float64) == 8
    for bad in ("torch.int3", object()):
        with pytest.raises(ValueError):
            bytes_per_element(bad)


def test_lm_dims_checks_each_field() -> None:
    good = dict(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    assert LMDims(**{**good, "layers": 1}).layers == 1  # 1 is a positive integer
    for field, value in (("hidden", 0), ("vocab", -1), ("layers", True), ("heads", 2.0)):
        with pytest.raises(ValueError, match=f"LMDims.{field} must be a positive integer"):
            LMDims(**{**good, field: value})


LLAMA_FIELDS = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
                "vocab_size": 10}  # fmt: skip


def test_dims_from_configs_by_hand() -> None:
    # Without num_key_value_heads and head_dim: kv_heads = heads = 2, head_dim = hidden / heads = 4.
    want = LMDims(hidden=8, layers=2, heads=2, kv_heads=2, head_dim=4, intermediate=16, vocab=10)
    assert LMDims.from_config(LLAMA_FIELDS) == want
    assert LMDims.from_config({"text_config": LLAMA_FIELDS}) == want
    assert LMDims.from_config(types.SimpleNamespace(**LLAMA_FIELDS)) == want
    assert LMDims.from_config(types.SimpleNamespace(text_config=types.SimpleNamespace(**LLAMA_FIELDS))) == want
    # An object whose get_text_config() holds the fields (as transformers' composite configs do).
    composite = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(**LLAMA_FIELDS))
    assert LMDims.from_config(composite) == want
    gqa = LMDims.from_config({**LLAMA_FIELDS, "num_key_value_heads": 1, "head_dim": 3})
    assert (gqa.kv_heads, gqa.head_dim) == (1, 3)
    with pytest.raises(ValueError, match="the config has no vocab_size"):
        LMDims.from_config({k: v for k, v in LLAMA_FIELDS.items() if k != "vocab_size"})


def test_vision_tokens_by_hand() -> None:
    clip = {"image_size": 336, "patch_size": 14}  # 24 x 24 patches
    assert vision_tokens({"vision_config": clip}) == (576, "(336 / 14)^2 patches of one image")
    assert vision_tokens({"vision_config": clip, "vision_feature_select_strategy": "full"})[0] == 577  # + CLS
    assert vision_tokens({"vision_config": {"image_size": 336}}) is None
    assert vision_tokens({"model_type": "nothing_known"}) is None
    assert vision_tokens({"model_type": "llama"}) is None  # a transformers config object without a vision config
    assert type(vision_tokens({"vision_config": clip})[0]) is int
    # Grid pinpoints count only for LLaVA-NeXT: LLaVA-1.5 gives the one view's 576 whatever the config lists.
    assert vision_tokens({"vision_config": clip, "image_grid_pinpoints": [[336, 672]]})[0] == 576
    # LLaVA-NeXT: base 576 + the largest grid (672 x 672: 48 x 48 patches) + one newline per row of 48 = 2928.
    next_config = {"model_type": "llava_next", "vision_config": clip,
                   "image_grid_pinpoints": [[336, 672], [672, 672], [336, 1008]]}  # fmt: skip
    assert vision_tokens(next_config) == (2928, "a 672x672 px image: base view + largest anyres grid + newlines")
    assert type(vision_tokens(next_config)[0]) is int


def test_weight_dtype_by_hand() -> None:
    assert weight_dtype({"dtype": "bfloat16", "torch_dtype": "float32"}) == "bfloat16"
    assert weight_dtype({"torch_dtype": "float16"}) == "float16"
    assert weight_dtype({"text_config": {"torch_dtype": "float32"}}) == "float32"
    assert weight_dtype({"dtype": "bfloat16x", "text_config": {"dtype": "fp8"}}) == "fp8"
    assert weight_dtype({"dtype": 16}) is None and weight_dtype({}) is None


def test_presets_carry_their_names_and_descriptions() -> None:
    for name, preset in presets().items():
        assert preset.name == name and isinstance(preset.description, str) and preset.description
