"""PyramidDrop against its independent reference (``pmod.testing.reference_pruning``): stage by stage the vision
tokens still kept are ranked by the last token's attention in the boundary layer and ``floor(n * keep**s)`` stay;
the ranking rows, the cache and the analytic cost per stage. Decoding, batching, save/load and the FLOPs against
FlopCounterMode on every backbone are tests/test_matrix.py's."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import pmod
from pmod import PDropConfig
from pmod.analysis.analytic_flops import estimate
from pmod.core.cache import cache_of
from pmod.testing import routed_batch, tiny_llama, tiny_llama_config
from pmod.testing.reference import reference_logits
from pmod.testing.reference import reference_rules as model_reference_rules
from pmod.testing.reference_pruning import PAPER, PDropReference

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False)]  # unequal vision counts, scattered, no image
LAYERS, KEEP = [2, 3, 5], 0.6  # 0.6: floor(n 0.6^s) differs from flooring stage by stage (23: 13, 8, 4)
CONFIG = PDropConfig(layers=LAYERS, keep=KEEP)


def models(attn: str = "sdpa", config: PDropConfig = CONFIG) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=6, attn_implementation="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norm weights away from 1, so that a rule that skipped a norm would differ
        for name, param in dense.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
    model = pmod.convert(copy.deepcopy(dense), config)
    model.set_attn_implementation(attn)
    return dense, model


def reference_rules(dense: torch.nn.Module, layers=LAYERS, keep=KEEP) -> dict[int, PDropReference]:
    ref = PDropReference(layers, keep)
    return {i: ref for i in range(layers[0], 6)}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compacted_equals_reference(padding_side: str, attn: str) -> None:
    dense, model = models(attn)
    ids, am, vm = routed_batch(ROWS, padding_side)
    rules = reference_rules(dense)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_logits(dense, rules, ids, am, vm)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    # Per stage: the kept vision tokens by hand (floor of the ORIGINAL count times keep^s), a subset of the stage
    # before, the same in every layer of the stage.
    for b, (_, n_vision, _) in enumerate(ROWS):
        before = set((vm & real)[b].nonzero().flatten().tolist())
        for stage, start in enumerate(LAYERS, start=1):
            kept = set((rec.processed[start][0][b] & vm[b]).nonzero().flatten().tolist())
            assert len(kept) == math.floor(n_vision * KEEP**stage) and kept <= before, (b, stage)
            end = LAYERS[stage] if stage < len(LAYERS) else 6
            for layer in range(start, end):
                assert set((rec.processed[layer][0][b] & vm[b]).nonzero().flatten().tolist()) == kept
            before = kept


def test_ranking_rows_are_the_restricted_attention_of_each_boundary() -> None:
    """The recorded weights are the boundary layer's last-token attention over the tokens still kept (0 on the
    dropped ones): the reference's rows, from transformers' eager attention with the same keys masked."""
    dense, model = models("sdpa")
    ids, am, vm = routed_batch(ROWS, "left")
    rules = reference_rules(dense)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
        reference_logits(dense, rules, ids, am, vm)
    real = am.bool()
    rows = rules[LAYERS[0]].ranking_rows
    for layer in LAYERS:
        torch.testing.assert_close(rec.weights[layer][0][real], rows[layer][real], atol=1e-6, rtol=1e-5)
    # Later stages really restrict the attention: tokens dropped at the first boundary get exactly 0.
    dropped = vm & real & ~rec.processed[LAYERS[0]][0]
    assert bool(dropped.any()) and bool((rec.weights[LAYERS[1]][0][dropped] == 0).all())


def test_cache_holds_only_each_stages_tokens() -> None:
    _, model = models()
    ids, am, vm = routed_batch(ROWS, "right")
    with torch.no_grad():
        cache = cache_of(model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=True))
    size = pmod.kv_cache_bytes(cache)
    stage = {2: 1, 3: 2, 4: 2, 5: 3}
    for layer in range(6):
        if layer < 2:
            assert size.layer_slots[layer] == ids.shape[1]
        else:
            want = [t + math.floor(v * KEEP ** stage[layer]) for t, v, _ in ROWS]
            assert size.layer_tokens[layer] == want, layer


def test_analytic_cost_counts_each_stage() -> None:
    """Each stage's kept vision tokens, floor(n keep^s) of the original count, in the analytic cost and the layer
    ratios (the matrix checks the totals against FlopCounterMode and the stored settings)."""
    report = estimate(tiny_llama_config(6), CONFIG, n_vision=32, n_text=16)
    assert [c.kept_vision for c in report.routed_layers] == [32, 32, 19, 11, 11, 6]  # floor(32 * 0.6^s)
    assert CONFIG.layer_ratios(6) == [None, None, KEEP, KEEP**2, KEEP**2, KEEP**3]


def test_defaults_are_the_papers_and_settings_are_checked() -> None:
    cfg = PDropConfig()
    assert {"layers": cfg.layers, "keep": cfg.keep} == PAPER["pdrop"]
    assert cfg.layer_ratios(32) == [None] * 8 + [0.5] * 8 + [0.25] * 8 + [0.125] * 8
    assert PDropConfig(layers=(8, 16, 24)) == cfg  # a tuple is stored as the list config.json gives back
    with pytest.raises(ValueError, match=r"^PyramidDrop boundary layer 24 is beyond the model's 6 layers"):
        pmod.convert(tiny_llama(num_layers=6), cfg)
    for bad, words in (([0, 3], "start at 1"), ([3, 3], "must increase"), ([], "at least one")):
        with pytest.raises(ValueError, match=words):
            PDropConfig(layers=bad)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        PDropConfig(keep=0.0)
    from pmod.recipes.train import TrainError, parse_args

    with pytest.raises(TrainError, match=r"pdrop is training-free.*pmod\.PDropConfig\(\.\.\.\)"):
        parse_args(["--model", "m", "--method", "pdrop"])
    # reference_rules(model) holds lambda to the paper's unless the test declares its own.
    _, model = models()
    with pytest.raises(ValueError, match="keep is 0.6 but the reference uses 0.5"):
        model_reference_rules(model)
    assert sorted(model_reference_rules(model, keep=KEEP)) == [2, 3, 4, 5]


def test_generate_pdrop_on_a_dense_folder_equals_convert(tmp_path, capsys) -> None:
    """``pmod generate --method pdrop`` applies it on the fly, as pmod.convert would (answer and KV share)."""
    from test_cli_methods import generate_on_the_fly

    err, share = generate_on_the_fly(tmp_path, capsys, 6, PDropConfig(layers=[2, 3], keep=0.4),
                                     ["--method", "pdrop", "--pdrop-layers", "2-3", "--pdrop-keep", "0.4"])
    assert f", {share})" in err and share != "100.0%"
