"""Vision tower pre-training on per-patch labels: it teaches the tower what LLaVA reads, and touches nothing else."""

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from pmod.data import synth
from pmod.experiments.vision_pretrain import load_patch_dataset, patch_accuracy, pretrain_vision_tower
from pmod.testing import tiny_llava_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vp")
    synth.generate(root / "data", 160, seed=1, image_size=64, max_shapes=1, test_fraction=0.25)
    folder = tiny_llava_folder(str(root / "model"), num_layers=2, image_size=64, patch_size=8, vision_hidden=64,
                               vision_layers=2, vision_feature_layer=-2)  # fmt: skip
    records = {s: json.loads((root / "data" / f"{s}.json").read_text()) for s in ("train", "test")}
    return root, folder, records


def test_held_out_patches_learn_colour_and_position(setup):
    root, folder, records = setup
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    before = {n: p.clone() for n, p in model.named_parameters()}
    result = pretrain_vision_tower(
        model, processor, records["train"], root / "data", steps=200, eval_records=records["test"], progress=False
    )
    acc = result["accuracy"]
    # chance: 1/6 colours on shape patches, 1/8 rows and columns (8x8 patches; coordinates rounded to a patch)
    assert acc["color_on_object"] > 0.8 and acc["row"] > 0.6 and acc["column"] > 0.6, acc
    assert acc["side_on_object"] > 0.65, acc  # always "left": 1/2 (120 training images; the demo reaches 0.99)
    assert result["loss"][-1][1] < result["loss"][0][1] / 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".vision_tower." in n for n in changed), sorted(changed)
    # the accuracy is measured on the features LLaVA feeds the projector
    pixels, targets = load_patch_dataset(records["test"], root / "data", processor, 8)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels)
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    assert torch.cat(list(features)).shape[0] == targets["row"].numel()


def test_patch_accuracy_counts_by_hand():
    """With an identity tower stand-in, heads that always say 'background' score the background share."""

    class Tower(torch.nn.Module):
        config = None

        def forward(self, pixel_values, output_hidden_states=True):
            hidden = torch.zeros(pixel_values.shape[0], 5, 2)
            return type("O", (), {"hidden_states": (hidden, hidden)})()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = Tower()
            self.config = type("C", (), {"vision_feature_layer": -2})()

    heads = torch.nn.ModuleDict(
        {"shape": torch.nn.Linear(2, 5), "color": torch.nn.Linear(2, 7), "column": torch.nn.Linear(2, 1)}
    )
    for head in heads.values():
        torch.nn.init.zeros_(head.weight)
        head.bias.data = torch.tensor([1.0] + [0.0] * (head.out_features - 1))  # always class 0
    heads["column"].bias.data = torch.tensor([0.4])  # coordinate 0.4 on a 2-wide grid rounds to column 1
    targets = {
        "shape": torch.tensor([[0, 0, 1, 2], [0, 0, 0, 3]]),
        "color": torch.tensor([[0, 0, 1, 2], [0, 0, 0, 3]]),
        "column": torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]),
    }
    acc = patch_accuracy(Model(), heads, torch.zeros(2, 3, 8, 8), targets)
    assert acc["shape"] == 5 / 8 and acc["shape_on_object"] == 0.0 and acc["color"] == 5 / 8
    assert acc["column"] == 0.5


def test_side_target_marks_the_shape_patches_by_their_half(setup):
    """``side`` is 0 on background and 1/2 (left/right) on shape patches, matching the generator's answer."""
    root, folder, records = setup
    processor = AutoProcessor.from_pretrained(folder)
    sample = [r for r in records["train"] if "meta" in r][:12]
    _, targets = load_patch_dataset(sample, root / "data", processor, 8)
    for record, side, shape, column in zip(sample, targets["side"], targets["shape"], targets["column"]):
        assert torch.equal(side > 0, shape > 0)
        assert torch.equal(side[shape > 0], 1 + (column[shape > 0] >= 4).long())
        x0, _, x1, _ = record["meta"]["shapes"][0]["bbox"]
        assert set(side[shape > 0].tolist()) == {1 if (x0 + x1) / 2 < 32 else 2}  # 64 px images


def test_refuses_records_without_labels(setup):
    root, folder, records = setup
    processor = AutoProcessor.from_pretrained(folder)
    no_meta = [{k: v for k, v in r.items() if k != "meta"} for r in records["train"]]
    with pytest.raises(ValueError, match="no image records with 'meta'"):
        load_patch_dataset(no_meta, root / "data", processor, 8)


@pytest.mark.parametrize("patch_local", [False, True])
def test_a_patch_local_tower_keeps_each_token_to_its_patch(setup, patch_local):
    """With ``patch_local`` the tower's attention outputs are zero and stay zero through pre-training, so repainting
    one patch changes that patch's feature token alone; the default tower mixes it into every token (the control)."""
    from pmod.experiments.small_llava import build_small_llava, tower_attention_outputs

    root, _, records = setup
    model, processor = build_small_llava(num_layers=2, image_size=64, patch_size=8, vision_hidden=64,
                                         vision_layers=3, patch_local=patch_local)  # fmt: skip
    pretrain_vision_tower(model, processor, records["train"][:16], root / "data", steps=3, batch_size=4,
                          progress=False, patch_local=patch_local)  # fmt: skip
    outputs = tower_attention_outputs(model)
    assert len(outputs) == 3 and all(bool((m.weight == 0).all()) == patch_local for m in outputs)
    pixels, _ = load_patch_dataset(records["test"][:1], root / "data", processor, 8)
    repainted = pixels.clone()
    repainted[..., :8, :8] = torch.randn(3, 8, 8)  # the top-left patch: token 0 of the 64
    with torch.no_grad():
        before, after = (model.model.get_image_features(pixel_values=p) for p in (pixels, repainted))
    before, after = (f.pooler_output if hasattr(f, "pooler_output") else f for f in (before, after))
    changed = (torch.cat(list(before)) - torch.cat(list(after))).abs().amax(-1) > 1e-6
    assert changed[0] and bool(changed[1:].any()) != patch_local
