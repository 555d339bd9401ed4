"""Every method on every backbone family beyond LLaVA-1.5/NeXT: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision,
with a single image, two images and a video per row (tiny random models, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pmod
from pmod.analysis.analytic_flops import counted_flops, estimate
from pmod.core.backbone import backbone_for
from pmod.testing import randomize_routers
from pmod.testing.multimodal import (
    IMAGE_ID,
    START_ID,
    VIDEO_ID,
    onevision_batch,
    qwen_vl_batch,
    tiny_llava_onevision,
    tiny_qwen_vl,
)
from pmod.testing.reference import capture_decoder_inputs, reference_decoder_logits, reference_rules

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
RATIOS = [None, 0.9, 0.5, 0.5, 0.25, 0.15]
# A random model may pick a vision token; recomputing its own output would then count one vision token too many.
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMAGE_ID, VIDEO_ID, START_ID])


def build(family: str, seed: int = 0) -> tuple[torch.nn.Module, dict, list]:
    """(dense model, a left-padded batch of 3 rows: one image, two images, a video, the rows)."""
    if family == "llava_onevision":
        model = tiny_llava_onevision(num_layers=6, seed=seed)
        rows = [(3, [("image", (64, 64))], 2), (2, [("image", (32, 64)), ("image", (32, 32))], 3),
                (4, [("video", 4)], 1)]  # fmt: skip
        return model, onevision_batch(model, rows, seed=seed), rows
    model = tiny_qwen_vl(family, num_layers=6, seed=seed)
    rows = [(3, [("image", (4, 4))], 2), (2, [("image", (4, 6)), ("image", (2, 2))], 3), (4, [("video", (4, 4, 4))], 1)]
    return model, qwen_vl_batch(model, rows, seed=seed), rows


def routed(family: str, config: pmod.MethodConfig | None = None) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), config or pmod.PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    return dense, model, batch


def vision_of(batch: dict) -> torch.Tensor:
    return ((batch["input_ids"] == IMAGE_ID) | (batch["input_ids"] == VIDEO_ID)) & batch["attention_mask"].bool()


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_with_zero_routers_is_the_base_model(family: str) -> None:
    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), pmod.PModConfig(schedule="constant", ratio=1.0))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[real], dense(**batch).logits[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_layers_equal_the_masked_reference(family: str) -> None:
    """The compacted execution against the reference run on what the dense model feeds its layers (merged
    embeddings, M-RoPE cos/sin, deepstack additions)."""
    dense, model, batch = routed(family)
    decoder = backbone_for(dense).decoder(dense)
    captured = capture_decoder_inputs(dense, decoder, **batch)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        got = model(**batch).logits
        want = reference_decoder_logits(dense, decoder, reference_rules(model), captured, real, vision_of(batch))
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    if family == "qwen3_vl":  # deepstack adds after layers 0-2, at the vision rows only
        added = [d is not None for d in captured.between]
        assert added[:3] == [True, True, True] and not any(added[3:])
        assert all(bool((captured.between[i].abs().sum(-1) > 0).eq(vision_of(batch)).all()) for i in range(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_recomputation(family: str) -> None:
    _, model, batch = routed(family)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=20, **GEN)
        full = model.generate(**batch, max_new_tokens=20, use_cache=False, **GEN)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_are_the_dense_models(family: str) -> None:
    """M-RoPE positions of the decode steps (rope_deltas) reach the layers unchanged by routing."""
    dense, model, batch = routed(family)
    seen: dict[str, list[torch.Tensor]] = {"dense": [], "routed": []}
    for name, m in (("dense", dense), ("routed", model)):
        layer = backbone_for(m).decoder_layers(m)[0]
        hook = layer.register_forward_pre_hook(
            lambda mod, a, k, name=name: seen[name].append(k["position_embeddings"][0]), with_kwargs=True
        )
        with torch.no_grad():
            m.generate(**batch, max_new_tokens=4, **GEN)
        hook.remove()
    assert len(seen["dense"]) == len(seen["routed"]) == 4
    for a, b in zip(seen["dense"][1:], seen["routed"][1:]):  # the decode steps
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_rows_alone(family: str) -> None:
    dense, model, batch = routed(family)
    _, _, rows = build(family)
    make = onevision_batch if family == "llava_onevision" else qwen_vl_batch
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=8, **GEN)[:, -8:]
        for r, row in enumerate(rows):
            alone = model.generate(**make(dense, [row], first_row=r), max_new_tokens=8, **GEN)[:, -8:]
            assert torch.equal(alone[0], together[r]), f"row {r}"


@pytest.mark.parametrize("family", FAMILIES)
def test_video_and_two_image_rows_route_all_their_vision_tokens(family: str) -> None:
    _, model, batch = routed(family)
    vision = vision_of(batch)
    text = (batch["attention_mask"].bool() & ~vision).sum(1)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(**batch)
    for layer, ratio in enumerate(RATIOS):
        if ratio is None:
            continue
        processed = rec.processed[layer][0]
        kept = (processed & vision).sum(1)
        assert kept.tolist() == [int(n * ratio) for n in vision.sum(1).tolist()]  # over every image / video token
        assert (processed & ~vision & batch["attention_mask"].bool()).sum(1).tolist() == text.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["pmod", "mod", "gamma_mod", "fastv", "pdrop", "dart"])
def test_save_load_gives_identical_logits(family: str, method: str, tmp_path) -> None:
    config = {"pmod": pmod.PModConfig(), "mod": pmod.MoDConfig(), "gamma_mod": pmod.GammaMoDConfig(layers=[1, 3]),
              "fastv": pmod.FastVConfig(layer=2), "pdrop": pmod.PDropConfig(layers=[2, 4]),
              "dart": pmod.DARTConfig(layer=2, keep=0.5)}[method]  # fmt: skip
    _, model, batch = routed(family, config)
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = pmod.load(tmp_path)
    assert type(pmod.get_method_config(loaded)) is type(config)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_flops_equal_flop_counter(family: str) -> None:
    """What routing saves, analytically, is what FlopCounterMode counts less (the tower and the rest are common):
    one row, no padding."""
    dense, model, _ = routed(family)
    make = onevision_batch if family == "llava_onevision" else qwen_vl_batch
    _, _, rows = build(family)
    one = make(dense, rows[:1])
    counts = {}
    for name, m in (("dense", dense), ("routed", model)):
        m.set_attn_implementation("eager")  # counted matmuls everywhere (torch does not count CPU sdpa)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            m(**one, use_cache=False)
        counts[name] = counted_flops(counter)
    n_vision = int(vision_of(one).sum())
    n_text = int(one["attention_mask"].sum()) - n_vision
    report = estimate(model.config, pmod.get_method_config(model), n_vision=n_vision, n_text=n_text)
    assert counts["dense"] - counts["routed"] == report.dense_flops - report.routed_flops
    assert report.routed_flops < report.dense_flops


@pytest.mark.parametrize("family", FAMILIES)
def test_viz_lays_tokens_on_the_models_grid(family: str) -> None:
    """The routing plot's grid is the model's own: Qwen-VL's merged patch grid, OneVision's base view."""
    from PIL import Image

    from pmod.analysis.plots import image_routing

    dense, model, _ = routed(family)
    make = onevision_batch if family == "llava_onevision" else qwen_vl_batch
    _, _, rows = build(family)
    one = make(dense, rows[:1])
    routing = image_routing(model, None, one, Image.new("RGB", (64, 64)))
    rows_, cols = routing.grid
    assert (rows_, cols) == ((4, 4) if family == "llava_onevision" else (2, 2))
    assert routing.kept.shape == (sum(r is not None for r in RATIOS), int((one["input_ids"] == IMAGE_ID).sum()))
    assert routing.image.shape[:2] == (rows_ * 16, cols * 16)  # the image itself, resized to the grid


@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_freezes_the_tower(family: str) -> None:
    from pmod.recipes.training import set_trainable

    _, model, _ = routed(family)
    set_trainable(model, "finetune")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    tower = "visual" if family.startswith("qwen") else "vision_tower"
    assert frozen and all(f".{tower}." in f".{n}." for n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if f".{tower}." not in f".{n}.")
    set_trainable(model, "pretrain")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    projector = "merger" if family.startswith("qwen") else "multi_modal_projector"
    assert trained and all(projector in n for n in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation_equals_the_dynamic_cache(family: str) -> None:
    """``generate(cache_implementation="static")`` (K/V preallocated, the routed layers' slot records as decode masks;
    ``generate`` hands these models a dict of 4-D masks per layer type) gives the tokens and logits of the default
    dynamic cache on images, two images and a video in one left-padded batch."""
    from pmod.core.cache import RoutedStaticCache, cache_of

    _, model, batch = routed(family)
    gen = dict(GEN, max_new_tokens=5, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(**batch, **gen)
        static = model.generate(**batch, cache_implementation="static", **gen)
    assert isinstance(cache_of(static), RoutedStaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=0)
