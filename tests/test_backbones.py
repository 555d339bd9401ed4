"""What is particular to the backbone families beyond LLaVA-1.5/NeXT: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
LLaVA-OneVision, with a single image, two images and a video per row (tiny random models, no downloads). The checks
every method passes on every family are tests/test_matrix.py's."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import pmod
from pmod.core.backbone import backbone_for
from pmod.testing import randomize_routers
from pmod.testing.families import tiny_inputs, tiny_model, vision_tokens
from pmod.testing.multimodal import IMAGE_ID, START_ID, VIDEO_ID
from pmod.testing.reference import capture_decoder_inputs

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
RATIOS = [None, 0.9, 0.5, 0.5, 0.25, 0.15]
# A random model may pick a vision token; recomputing its own output would then count one vision token too many.
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None, suppress_tokens=[IMAGE_ID, VIDEO_ID, START_ID])


@functools.cache
def build(family: str) -> tuple[torch.nn.Module, dict, dict]:
    """(dense model, its left-padded batch of 3 rows: one image, two images, a video; the first row alone), built
    once a family: a test that changes the model works on a copy."""
    model = tiny_model(family, num_layers=6)
    tiny = tiny_inputs(model)
    return model, tiny.batch, tiny.rows[0]


@functools.cache
def routed(family: str) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(dense model, its p-MoD conversion with random routers, the batch), built once a family (as ``build``)."""
    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), pmod.PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    return dense, model, batch


def vision_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return vision_tokens(model, batch)


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_one_with_zero_routers_is_the_base_model(family: str) -> None:
    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), pmod.PModConfig(schedule="constant", ratio=1.0))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits[real], dense(**batch).logits[real], atol=1e-5, rtol=0)


def test_qwen3_vl_deepstack_adds_after_the_first_layers_at_the_vision_rows() -> None:
    """What the reference replays between layers (the matrix's Qwen3-VL cells rely on it): Qwen3-VL's deepstack adds
    after layers 0-2, at the vision rows only, and nothing after the others."""
    dense, batch, _ = build("qwen3_vl")
    captured = capture_decoder_inputs(dense, backbone_for(dense).decoder(dense), **batch)
    added = [d is not None for d in captured.between]
    assert added[:3] == [True, True, True] and not any(added[3:])
    vision = vision_of(dense, batch)
    assert all(bool((captured.between[i].abs().sum(-1) > 0).eq(vision).all()) for i in range(3))


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
def test_viz_lays_tokens_on_the_models_grid(family: str) -> None:
    """The routing plot's grid is the model's own: Qwen-VL's merged patch grid, OneVision's base view."""
    from PIL import Image

    from pmod.analysis.plots import image_routing

    _, model, _ = routed(family)
    _, _, one = build(family)
    routing = image_routing(model, None, one, Image.new("RGB", (64, 64)))
    rows_, cols = routing.grid
    assert (rows_, cols) == ((4, 4) if family == "llava_onevision" else (2, 2))
    assert routing.kept.shape == (sum(r is not None for r in RATIOS), int((one["input_ids"] == IMAGE_ID).sum()))
    assert routing.image.shape[:2] == (rows_ * 16, cols * 16)  # the image itself, resized to the grid


@pytest.mark.parametrize("family", FAMILIES)
def test_stage2_freezes_the_tower(family: str) -> None:
    from pmod.recipes.training import set_trainable

    model = copy.deepcopy(routed(family)[1])
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
