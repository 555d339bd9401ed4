"""Method settings the generic checks do not cover: pmod 0.1's folders, MoD's layer sets and its identity at ratio 1.
The checks every method passes on every backbone (reference, decoding, batching, save/load, FLOPs) are
tests/test_matrix.py's."""

from __future__ import annotations

import copy
import json

import torch

import pmod
from pmod import MoDConfig, PModConfig
from pmod.testing import llava_batch, randomize_routers, routed_batch, tiny_llama, tiny_llava

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False)]  # batch 3: unequal vision counts, scattered, no image


def test_folders_of_pmod_0_1_still_load(tmp_path) -> None:
    """pmod 0.1 stored the p-MoD settings under "pmod"; such a folder loads with its routers."""
    model = pmod.convert(tiny_llava(num_layers=6), PModConfig(beta=0.45))
    randomize_routers(model, scale=3.0)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pmod"] = config.pop("pmod_method")["settings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    batch = llava_batch(model, [(3, 5)], [True])
    loaded = pmod.load(tmp_path)
    assert pmod.get_method_config(loaded) == PModConfig(beta=0.45)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_mod_defaults_and_identity_at_ratio_one() -> None:
    assert MoDConfig().layer_ratios(8) == [None, None, 0.5, 0.5, 0.5, 0.5, 0.5, None]  # deep_all: layers 2..L-2
    assert MoDConfig(layers="interleave").layer_ratios(6) == [None, 0.5, None, 0.5, None, 0.5]
    # Zero routers give w~ = 0 + 1: with every token kept the model computes exactly what the base model does.
    dense = tiny_llama(num_layers=6)
    model = pmod.convert(copy.deepcopy(dense), MoDConfig(ratio=1.0, layers="deep_all"))
    ids, am, vm = routed_batch(ROWS, "right")
    real = am.bool()  # padding positions pass routed layers unchanged; the base model computes them
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=am, vision_mask=vm).logits[real],
            dense(input_ids=ids, attention_mask=am).logits[real],
            atol=1e-6,
            rtol=0,
        )
