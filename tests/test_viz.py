"""Routing visualisation: token -> pixel mapping, the routing collected for one image, and `pmod viz`."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoProcessor

import pmod
from pmod.analysis.plots import kept_pixel_mask
from pmod.cli import main
from pmod.recipes.viz import image_routing
from pmod.testing import tiny_llava_folder


def test_kept_pixel_mask_by_hand():
    kept = np.array([1, 0, 0, 1], dtype=bool)  # 2x2 grid: top-left and bottom-right kept
    mask = kept_pixel_mask(kept, (2, 2), (4, 6))
    want = np.array(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=bool,
    )
    assert np.array_equal(mask, want)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("viz")
    tiny_llava_folder(str(path), num_layers=6, image_size=32, patch_size=8, method_config=pmod.PModConfig())
    image = Image.new("RGB", (32, 32), (200, 200, 200))
    ImageDraw.Draw(image).rectangle((0, 0, 7, 7), fill=(230, 25, 25))
    image.save(path / "red.png")
    return path


def test_image_routing_matches_the_recorded_forward(folder):
    model, processor = pmod.load(folder).eval(), AutoProcessor.from_pretrained(folder)
    image = Image.open(folder / "red.png").convert("RGB")
    routing = image_routing(model, processor, image, "What color is the shape ?")
    ratios = pmod.layer_ratios(model)
    assert routing.layers == [i for i, r in enumerate(ratios) if r is not None]
    assert routing.grid == (4, 4) and routing.kept.shape == (len(routing.layers), 16)
    # Each layer keeps floor(16 * R) vision tokens.
    assert routing.kept.sum(1).tolist() == [int(np.floor(16 * ratios[i])) for i in routing.layers]
    # The un-normalised view is the image the model saw (a 32 px image passes the processor unchanged).
    assert np.abs(routing.image.astype(int) - np.asarray(image).astype(int)).max() <= 2
    # Independent check of one layer against a direct recorded forward.
    from pmod.io.model_folder import build_prompt

    inputs = processor(
        text=[build_prompt(processor, "What color is the shape ?", 1)], images=[image], return_tensors="pt"
    )
    with pmod.record_routing(model) as rec, torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    vision = inputs["input_ids"][0] == model.config.image_token_id
    layer = routing.layers[-1]
    assert np.array_equal(routing.kept[-1], rec.processed[layer][0][0][vision].numpy())
    # The weights shown are TanhNorm's 0.2 tanh(logit) + 1 of each layer's router on that layer's input.
    layers = pmod.routed_layers(model)
    with torch.no_grad():
        want = [0.2 * torch.tanh(layers[i].router(hidden[i])[0, vision, 0]) + 1 for i in routing.layers]
    np.testing.assert_allclose(routing.weights, torch.stack(want).numpy(), atol=1e-6, rtol=0)


def test_pmod_viz_command(folder, tmp_path, capsys):
    rc = main(["viz", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", "What color ?",
               "--out", str(tmp_path / "plots")])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["kept_tokens.png", "schedule.png", "token_heatmap.png"]
    assert all(Image.open(tmp_path / "plots" / n).size[0] > 100 for n in names)


@pytest.mark.parametrize(
    ("config", "kept"),
    [
        (pmod.MoDConfig(ratio=0.25, layers=[2, 3]), {2: 4, 3: 4}),
        (pmod.GammaMoDConfig(layers=[1, 4], skip_ratio=0.5), {1: 8, 4: 8}),  # no question mask: text is kept
        (pmod.FastVConfig(layer=4, keep=0.3), {4: 5, 5: 5}),  # round(16 * 0.3)
    ],
    ids=lambda c: getattr(c, "method", ""),
)
def test_viz_every_method(tmp_path, capsys, config, kept):
    folder = tmp_path / "model"
    tiny_llava_folder(str(folder), num_layers=6, image_size=32, patch_size=8, method_config=config)
    model, processor = pmod.load(folder).eval(), AutoProcessor.from_pretrained(folder)
    routing = image_routing(model, processor, Image.new("RGB", (32, 32), (9, 9, 9)), "What color ?")
    assert dict(zip(routing.layers, routing.kept.sum(1).tolist())) == kept
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    rc = main(["viz", "--model", str(folder), "--image", str(tmp_path / "x.png"), "--prompt", "What ?",
               "--out", str(tmp_path / "plots")])  # fmt: skip
    assert rc == 0 and len(list((tmp_path / "plots").iterdir())) == 3
