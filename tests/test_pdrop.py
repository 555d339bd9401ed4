"""PyramidDrop against its independent reference (``pmod.testing.reference_pruning``): stage by stage the vision
tokens still kept are ranked by the last token's attention in the boundary layer and ``floor(n * keep**s)`` stay;
batched = rows alone, cached decoding = recomputation, save/load, analytic FLOPs = FlopCounterMode."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import pmod
from pmod import PDropConfig
from pmod.analysis.analytic_flops import counted_flops, estimate, flop_counter
from pmod.core.cache import cache_of
from pmod.testing import greedy_steps, llava_batch, routed_batch, tiny_llama, tiny_llava
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


def test_cached_greedy_decoding_equals_recomputation() -> None:
    """Cached decoding against the reference recomputed over prompt + generated tokens (teacher-forced; the
    ranking stays the prompt's)."""
    dense, model = models()
    ids, am, vm = routed_batch(ROWS, "left", seed=2)
    new, logits = greedy_steps(model, ids, am, vm, steps=10)
    full = torch.cat([ids, new], dim=1)
    full_am = torch.cat([am, torch.ones_like(new)], dim=1)
    full_vm = torch.cat([vm, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        want = reference_logits(dense, reference_rules(dense), full, full_am, full_vm, prompt_length=ids.shape[1])
    torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=0)
    assert torch.equal(want[:, ids.shape[1] - 1 : -1].argmax(-1), new)


def test_batched_equals_rows_alone() -> None:
    _, model = models()
    ids, am, vm = routed_batch(ROWS, "left", seed=4)
    together, _ = greedy_steps(model, ids, am, vm, steps=8)
    for r in range(len(ROWS)):
        real = am[r].bool()
        alone, _ = greedy_steps(model, ids[r : r + 1, real], am[r : r + 1, real], vm[r : r + 1, real], steps=8)
        assert torch.equal(alone[0], together[r]), f"row {r}"


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


def test_llava_save_load_gives_identical_logits(tmp_path) -> None:
    model = pmod.convert(tiny_llava(num_layers=6), CONFIG)
    batch = llava_batch(model, [(3, 5), (2, 2), (6, 1)], [True, True, False], "left")
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["pmod_method"]
    assert stored == {"method": "pdrop", "settings": {"layers": LAYERS, "keep": KEEP}}
    loaded = pmod.load(tmp_path)
    assert pmod.get_method_config(loaded) == CONFIG
    assert pmod.layer_ratios(loaded) == [None, None, KEEP, KEEP**2, KEEP**2, KEEP**3]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_analytic_flops_equal_flop_counter(attn: str) -> None:
    """``pmod flops`` counts what runs: each boundary's scoring row and each stage's kept tokens."""
    _, model = models(attn)
    n_text, n_vision = 16, 32
    vision = torch.zeros(1, n_text + n_vision, dtype=torch.bool)
    vision[:, 8 : 8 + n_vision] = True
    ids = torch.randint(4, 128, (1, n_text + n_vision))
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(input_ids=ids, vision_mask=vision, use_cache=False)
    report = estimate(model.config, CONFIG, n_vision=n_vision, n_text=n_text)
    assert counted_flops(counter) == report.routed_flops
    assert [c.kept_vision for c in report.routed_layers] == [32, 32, 19, 11, 11, 6]  # floor(32 * 0.6^s)


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
    from test_cli_methods import PROMPT, reference_generate

    from pmod.cli import main
    from pmod.testing import tiny_llava_folder

    folder = tiny_llava_folder(str(tmp_path / "dense"), num_layers=6)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (230, 25, 25)).save(image)
    rc = main(["generate", "--model", folder, "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "6",
               "--method", "pdrop", "--pdrop-layers", "2-3", "--pdrop-keep", "0.4"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    answer, share = reference_generate(Path(folder), PDropConfig(layers=[2, 3], keep=0.4), image)
    assert captured.out.strip() == answer
    assert f", {share})" in captured.err and share != "100.0%"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_multimodal_backbones_equal_the_masked_reference(family: str) -> None:
    """Qwen-VL (M-RoPE; Qwen3-VL's per-head q/k norms and deepstack) and OneVision, images and a video, left
    padding: the compacted model against the reference run on what the dense model feeds its layers."""
    from test_backbones import build, vision_of

    from pmod.core.backbone import backbone_for
    from pmod.testing.reference import capture_decoder_inputs, reference_decoder_logits

    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), PDropConfig(layers=[2, 4]))
    dense.set_attn_implementation("eager")  # the reference reads attention probabilities
    decoder = backbone_for(dense).decoder(dense)
    captured = capture_decoder_inputs(dense, decoder, **batch)
    real, vision = batch["attention_mask"].bool(), vision_of(batch)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(**batch).logits
        want = reference_decoder_logits(dense, decoder, model_reference_rules(model), captured, real, vision)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    n = vision.sum(1)
    assert (rec.processed[4][0] & vision).sum(1).tolist() == [math.floor(v * 0.25) for v in n.tolist()]
