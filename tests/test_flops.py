"""Analytic FLOPs/KV accounting: hand values, agreement with torch's FlopCounterMode, and the ``pmod flops`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from pmod import PModConfig
from pmod.analysis.analytic_flops import LMDims, counted_flops, estimate, flop_counter
from pmod.cli import main

TOY = LMDims(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
TOY_PMOD = PModConfig(schedule="explicit", ratios=[None, 0.5])


def test_toy_hand_values() -> None:
    # 4 vision + 2 text tokens, 1 sample; layer 0 dense (K = 6), layer 1 keeps 2 of 4 vision tokens (K = 4).
    r = estimate(TOY, TOY_PMOD, n_vision=4, n_text=2, batch_size=1, dtype="float16")
    dense, routed = r.routed_layers

    # q (8->8), k (8->4), v (8->4), o (8->8) on K tokens: 2 * K * 8 * (8 + 4 + 4 + 8)
    assert dense.attn_proj == 2 * 6 * 8 * 24 == 2304
    assert routed.attn_proj == 2 * 4 * 8 * 24 == 1536
    # QK^T and AV each: 2 * heads * K * K * head_dim over the full score matrix
    assert dense.attn_scores == dense.attn_values == 2 * 2 * 6 * 6 * 4 == 576
    assert routed.attn_scores == routed.attn_values == 2 * 2 * 4 * 4 * 4 == 256
    # gate + up + down: 3 * 2 * K * 8 * 16
    assert dense.mlp == 3 * 2 * 6 * 8 * 16 == 4608
    assert routed.mlp == 3 * 2 * 4 * 8 * 16 == 3072
    # router Linear(8, 1) on all 6 tokens, only in the p-MoD layer
    assert (dense.router, routed.router) == (0, 2 * 6 * 8) == (0, 96)
    assert (dense.flops, routed.flops) == (8064, 5216)
    assert (routed.kept_vision, routed.processed) == (2, 4)

    head = 2 * 6 * 8 * 10  # LM head on all 6 tokens
    assert r.lm_head_flops == head == 960
    assert r.dense_flops == 2 * 8064 + 960 == 17088
    assert r.routed_flops == 8064 + 5216 + 960 == 14240
    assert r.tflops_ratio == pytest.approx(14240 / 17088)
    assert r.to_dict()["tflops_ratio_without_lm_head"] == pytest.approx((8064 + 5216) / (2 * 8064))

    # KV: K and V, K tokens, 1 KV head of 4, 2 bytes
    assert r.dense_kv_bytes == 2 * (2 * 6 * 1 * 4 * 2) == 192
    assert r.routed_kv_bytes == 2 * 6 * 4 * 2 + 2 * 4 * 4 * 2 == 160
    assert r.kv_cache_ratio == pytest.approx(160 / 192)
    assert r.mean_retention == (1.0 + 0.5) / 2

    # Decode: per layer 2 * 8 * 24 (proj) + 2 * 3 * 8 * 16 (MLP) + 2 * 2 * heads * head_dim * (cached + 1)
    dense_step = 384 + 768 + 2 * 2 * 2 * 4 * (6 + 1)  # = 1376
    routed_step = 384 + 768 + 2 * 2 * 2 * 4 * (4 + 1) + 2 * 8  # router scores the new token: = 1328
    assert r.dense_decode_flops == 2 * dense_step + 2 * 8 * 10 == 2912
    assert r.routed_decode_flops == dense_step + routed_step + 160 == 2864

    # Batch and dtype scale linearly; the LM head can be left out of the totals.
    r3 = estimate(TOY, TOY_PMOD, n_vision=4, n_text=2, batch_size=3, dtype=torch.float32, include_lm_head=False)
    assert r3.dense_flops == 3 * 2 * 8064
    assert r3.routed_flops == 3 * (8064 + 5216)
    assert r3.routed_kv_bytes == 3 * 2 * 160
    keys = {"dense_tflops", "pmod_tflops", "tflops_ratio", "dense_kv_bytes", "pmod_kv_bytes", "kv_cache_ratio"}
    assert keys | {"mean_retention", "layers"} <= set(r3.to_dict())


def test_dims_from_configs() -> None:
    # LLaVA-1.5 (HF format): text_config lists only a few fields, the rest are LlamaConfig defaults.
    llava = {"model_type": "llava", "text_config": {"model_type": "llama", "vocab_size": 32064}}
    assert LMDims.from_config(llava) == LMDims(4096, 32, 32, 32, 128, 11008, 32064)
    qwen = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
    }
    assert LMDims.from_config(qwen) == LMDims(896, 24, 14, 2, 64, 4864, 151936)
    # A model type transformers does not know (the original LLaVA repo's) is read as a plain decoder config.
    assert LMDims.from_config({**qwen, "model_type": "llava_qwen"}) == LMDims(896, 24, 14, 2, 64, 4864, 151936)
    with pytest.raises(ValueError, match="has no hidden_size"):
        LMDims.from_config({"model_type": "unknown_thing"})


def _tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=100,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_dense_matches_flop_counter(attn: str) -> None:
    model = _tiny_llama(attn)
    ids = torch.randint(0, 100, (2, 40))
    # torch's counter misses CPU sdpa (it counts 0 for it); pmod's counter adds the same formula as for GPU sdpa.
    counter = FlopCounterMode(display=False) if attn == "eager" else flop_counter()
    with torch.no_grad(), counter:
        model(ids, use_cache=False)
    expected = estimate(model.config, n_vision=0, n_text=40, batch_size=2).dense_flops
    assert counted_flops(counter) == pytest.approx(expected, rel=0.02)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _prd_hand(layer: int, num_layers: int) -> float | None:
    r = 0.5 * math.cos(math.pi * layer / (num_layers - 1)) + 0.5
    return None if r >= 0.85 else max(r, 0.15)


def test_cli_json_llava_next(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run_cli(["flops", "--preset", "llava-next-7b", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    for key in ("dense_tflops", "pmod_tflops", "tflops_ratio", "dense_kv_bytes", "pmod_kv_bytes", "kv_cache_ratio"):
        assert key in data
    assert (data["n_vision"], data["n_text"]) == (2880, 64)
    assert data["mean_retention"] == 0.5375  # 8 dense + 8 at 0.15 + 16 cos values pairing to 1: 17.2 / 32
    assert len(data["layers"]) == 32
    processed = [2944 if (r := _prd_hand(i, 32)) is None else 64 + math.floor(2880 * r) for i in range(32)]
    assert [layer["processed"] for layer in data["layers"]] == processed
    assert data["kv_cache_ratio"] == pytest.approx(sum(processed) / (32 * 2944), rel=1e-12)
    assert 0.50 < data["tflops_ratio"] < 0.56
    assert data["dense_kv_bytes"] == 2 * 32 * 2944 * 4096 * 2  # K and V, 32 layers, fp16


def test_cli_config_folder_with_pmod(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    stored = PModConfig(schedule="constant", ratio=0.5)
    config = {
        "model_type": "llava_next",
        "text_config": {"model_type": "llama", "num_hidden_layers": 4, "vocab_size": 32064},
        "pmod": stored.to_dict(),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = _run_cli(["flops", str(tmp_path), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    # LLaVA-NeXT's own count for its largest anyres grid (672 x 672 px with CLIP-336/14): base 24x24 + 48x48 + 48
    assert data["n_vision"] == 576 + 48 * 48 + 48
    assert data["schedule"] == [None, 0.5, 0.5, 0.5]  # the stored settings
    assert data["mean_retention"] == (1 + 3 * 0.5) / 4
    code, out, _ = _run_cli(
        ["flops", str(tmp_path / "config.json"), "--pmod-ratio", "0.25", "--vision-tokens", "576"], capsys
    )
    assert code == 0
    assert "constant 0.25" in out and "576 vision" in out and "KV cache" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["flops", "/no/such/model/folder"],
        ["flops", "--preset", "llava-99b"],
        ["flops"],
        ["flops", "--preset", "llava-1.5-7b", "--pmod-schedule", "constant", "--pmod-ratio", "2"],
        ["flops", "--preset", "llava-1.5-7b", "--text-tokens", "-3"],
    ],
)
def test_cli_user_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("pmod flops: error: ") and err.count("\n") == 1


def test_cli_unreadable_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = _run_cli(["flops", str(tmp_path)], capsys)
    assert code == 2 and "config.json" in err and err.count("\n") == 1


def test_cli_costs_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    """Method flags come from the config fields: FastV, gamma-MoD with question tokens, an explicit p-MoD schedule."""
    code, out, _ = _run_cli(
        ["flops", "--preset", "llava-next-7b", "--method", "fastv", "--fastv-layer", "2", "--fastv-keep", "0.5",
         "--json"], capsys,
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["method"] == "fastv"
    assert [layer["processed"] for layer in data["layers"]] == [2944, 2944] + [64 + 1440] * 30
    assert data["layers"][1]["scoring"] == 2 * 2944 * 4096 * 4096 + 2 * 4096 * 4096 + 2 * 32 * 2944 * 128

    code, out, _ = _run_cli(
        ["flops", "--preset", "llava-1.5-7b", "--method", "gamma_mod", "--gamma-mod-layers", "1,2",
         "--question-tokens", "16", "--json"], capsys,
    )  # fmt: skip
    data = json.loads(out)
    assert [layer["processed"] for layer in data["layers"][:4]] == [640, 16 + 312, 16 + 312, 640]
    assert data["layers"][1]["router"] == 2 * 640 * 4096 * 2  # the shared Linear(hidden, 2) on every token

    ratios = ",".join(["none"] * 8 + ["0.5"] * 24)
    code, out, _ = _run_cli(
        ["flops", "--preset", "llava-1.5-7b", "--pmod-schedule", "explicit", "--pmod-ratios", ratios, "--json"],
        capsys,
    )
    data = json.loads(out)
    assert data["schedule"] == [None] * 8 + [0.5] * 24 and data["layers"][8]["processed"] == 64 + 288


def test_cli_method_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run_cli(["flops", "--preset", "llava-1.5-7b", "--mod-ratio", "0.3"], capsys)
    assert code == 2 and "--mod-ratio is a setting of method mod, but the method is pmod; pass --method mod" in err
    code, _, err = _run_cli(["flops", "--preset", "llava-1.5-7b", "--method", "fastv", "--fastv-keep", "x"], capsys)
    assert code == 2 and "--fastv-keep" in err and err.count("\n") == 1


def _qwen_vl_smart_resize(height: int, width: int) -> tuple[int, int]:
    # transformers' own resize rule (Qwen2-VL image processor); the PIL module exists from 5.1 on
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=28 * 28 * 1280 * 16)


def _onevision_image_tokens(height: int, width: int) -> int:
    # The LLaVA-OneVision processor's count, on an instance that carries only what the count reads.
    from types import SimpleNamespace

    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    processor = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    processor.image_processor = SimpleNamespace(image_grid_pinpoints=LlavaOnevisionConfig().image_grid_pinpoints)
    processor.num_image_tokens, processor.vision_aspect_ratio = (384 // 14) ** 2, "anyres_max_9"
    return processor._get_number_of_features(height, width, 384, 384)


@pytest.mark.parametrize(
    ("preset", "layers", "hidden", "vision_tokens"),
    [
        ("qwen2.5-vl-7b", 28, 3584, lambda: math.prod(_qwen_vl_smart_resize(720, 1280)) // 28**2),
        # 64 frames at 448x448, two frames per temporal patch, 2x2 merged 14-px patches
        ("qwen2.5-vl-7b-video", 28, 3584, lambda: 64 // 2 * math.prod(_qwen_vl_smart_resize(448, 448)) // 28**2),
        ("qwen3-vl-8b", 36, 4096, lambda: math.prod(_qwen_vl_smart_resize(720, 1280)) // 28**2),
        ("llava-onevision-7b", 28, 3584, lambda: _onevision_image_tokens(720, 1280)),
    ],
)
def test_new_backbone_presets(preset, layers, hidden, vision_tokens, capsys: pytest.CaptureFixture[str]) -> None:
    """The presets' vision-token counts are what the families' own processors give for the stated inputs."""
    code, out, _ = _run_cli(["flops", "--preset", preset, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["n_vision"] == vision_tokens()
    assert (data["dims"]["layers"], data["dims"]["hidden"]) == (layers, hidden)
    # dense prefill cost per token is at least the projections: a 7B-8B decoder is 12-16 GFLOPs per token
    per_token = data["dense_tflops"] * 1e12 / (data["n_vision"] + data["n_text"])
    assert 12e9 < per_token < 20e9
    assert data["tflops_ratio"] < 0.7 and data["kv_cache_ratio"] < 0.7


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ([], "p-MoD prd (beta 0.5, max ratio 0.85, min ratio 0.15)"),
        (["--pmod-schedule", "linear", "--pmod-beta", "0.4"],
         "p-MoD linear (beta 0.4, max ratio 0.85, min ratio 0.15)"),
        (["--pmod-schedule", "constant", "--pmod-ratio", "0.3"], "p-MoD constant 0.3"),
        (["--pmod-schedule", "explicit", "--pmod-ratios", "none" + ",0.5" * 31], "p-MoD explicit"),
        (["--method", "mod"], "MoD constant 0.5 on deep_all"),
        (["--method", "mod", "--mod-layers", "2,4"], "MoD constant 0.5 on layers [2, 4]"),
        (["--method", "gamma_mod", "--gamma-mod-layers", "1,3"], "gamma-MoD skip 0.5 on layers [1, 3]"),
        (["--method", "fastv", "--fastv-keep", "0.25"], "FastV K=2 keep 0.25"),
        (["--method", "pdrop"], "PyramidDrop boundaries [8, 16, 24] keep 0.5 per stage"),
        (["--method", "dart"], "DART K=2 keep 0.222, 4 vision + 4 text pivots"),
    ],
)
def test_cli_names_the_method_settings(flags: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The table's header line says which settings were costed, in each method's own words."""
    code, out, _ = _run_cli(["flops", "--preset", "llava-1.5-7b", *flags], capsys)
    assert code == 0
    assert out.splitlines()[1].endswith(f"bytes/element; {words}")
