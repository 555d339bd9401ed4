"""DART against its independent reference (``pmod.testing.reference_pruning``): pivots by the L1 norm of layer
K-1's keys, the vision tokens least cosine-similar to them kept from layer K on; batched = rows alone, cached
decoding = recomputation, save/load, analytic FLOPs = FlopCounterMode."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import pmod
from pmod import DARTConfig, PDropConfig
from pmod.analysis.analytic_flops import counted_flops, estimate, flop_counter
from pmod.core.cache import cache_of
from pmod.testing import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    greedy_steps,
    llava_batch,
    llava_next_batch,
    routed_batch,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
)
from pmod.testing.reference import reference_logits
from pmod.testing.reference_pruning import PAPER, DARTReference

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (7, 17, False)]  # unequal vision counts, scattered, no image
K, KEEP, PIVOTS, TEXT_PIVOTS = 2, 0.45, 2, 2  # 23 vision tokens: budget 10 = 2 pivots + 4 pivots x 2
CONFIG = DARTConfig(layer=K, keep=KEEP, pivots=PIVOTS, text_pivots=TEXT_PIVOTS)


def models(attn: str = "sdpa", config: DARTConfig = CONFIG) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=6, attn_implementation="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norm weights away from 1, so that a rule that skipped a norm would differ
        for name, param in dense.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
    model = pmod.convert(copy.deepcopy(dense), config)
    model.set_attn_implementation(attn)
    return dense, model


def reference_rules(dense: torch.nn.Module, keep: float = KEEP, pivots: int = PIVOTS) -> dict[int, DARTReference]:
    ref = DARTReference(K, keep, pivots, TEXT_PIVOTS, dense.model.norm)
    return {i: ref for i in range(K - 1, 6)}


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
    # The same kept tokens as the reference's, round(n * keep) per row, in every layer >= K.
    kept = rules[K].kept
    for b, (_, n_vision, _) in enumerate(ROWS):
        assert int(kept[b].sum()) == round(n_vision * KEEP)
        for layer in range(K, 6):
            assert torch.equal(rec.processed[layer][0][b] & vm[b], kept[b]), (b, layer)


@pytest.mark.parametrize("keep", [0.45, 0.3, 0.1])
def test_ranking_is_the_references_at_other_budgets(keep: float) -> None:
    """Budgets that split unevenly over the pivots (cut at the budget), and one below the vision pivots' count."""
    dense, model = models(config=DARTConfig(layer=K, keep=keep, pivots=3, text_pivots=TEXT_PIVOTS))
    ids, am, vm = routed_batch(ROWS, "left", seed=5)
    rules = reference_rules(dense, keep=keep, pivots=3)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
        reference_logits(dense, rules, ids, am, vm)
    assert torch.equal(rec.processed[K][0] & vm, rules[K].kept)


def test_the_rule_is_not_a_plain_top_k() -> None:
    """The kept set is neither the vision tokens with the largest key norms nor the least similar to the vision
    pivots alone: the text pivots and the turn-by-turn picks matter (the reference agrees with pmod above)."""
    dense, model = models()
    ids, am, vm = routed_batch(ROWS[:1], "left", seed=1)
    rules = reference_rules(dense)
    no_text = DARTReference(K, KEEP, PIVOTS, 0, dense.model.norm)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
        reference_logits(dense, rules, ids, am, vm)
        reference_logits(dense, {i: no_text for i in range(K - 1, 6)}, ids, am, vm)
    got = rec.processed[K][0] & vm
    assert torch.equal(got, rules[K].kept)
    assert not torch.equal(got, no_text.kept)
    norms = rules[K].key_norms[0].masked_fill(~vm[0], float("-inf"))
    by_norm = torch.zeros_like(got[0]).scatter(0, norms.topk(int(got.sum())).indices, True)
    assert not torch.equal(got[0], by_norm)


def test_cached_greedy_decoding_equals_recomputation() -> None:
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
    together, _ = greedy_steps(model, ids, am, vm, steps=8, own_positions=True)
    for r in range(len(ROWS)):
        real = am[r].bool()
        alone, _ = greedy_steps(
            model, ids[r : r + 1, real], am[r : r + 1, real], vm[r : r + 1, real], steps=8, own_positions=True
        )
        assert torch.equal(alone[0], together[r]), f"row {r}"


def test_cache_holds_only_kept_tokens() -> None:
    _, model = models()
    ids, am, vm = routed_batch(ROWS, "right")
    with torch.no_grad():
        cache = cache_of(model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=True))
    size = pmod.kv_cache_bytes(cache)
    for layer in range(6):
        if layer < K:
            assert size.layer_slots[layer] == ids.shape[1]
        else:
            assert size.layer_tokens[layer] == [t + round(v * KEEP) for t, v, _ in ROWS]


def test_llava_save_load_gives_identical_logits(tmp_path) -> None:
    model = pmod.convert(tiny_llava(num_layers=6), CONFIG)
    batch = llava_batch(model, [(3, 5), (2, 2), (6, 1)], [True, True, False], "left")
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["pmod_method"]
    settings = {"layer": K, "keep": KEEP, "pivots": PIVOTS, "text_pivots": TEXT_PIVOTS}
    assert stored == {"method": "dart", "settings": settings}
    loaded = pmod.load(tmp_path)
    assert pmod.get_method_config(loaded) == CONFIG
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_analytic_flops_equal_flop_counter(attn: str) -> None:
    """``pmod flops`` counts what runs: layer K-1's extra key projection and layer K's pivot similarities."""
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
    hidden, t = model.config.hidden_size, n_text + n_vision
    kv_width = model.config.num_key_value_heads * (hidden // model.config.num_attention_heads)
    assert report.routed_layers[K - 1].scoring == 2 * t * hidden * kv_width
    assert report.routed_layers[K].scoring == 2 * (PIVOTS + TEXT_PIVOTS) * t * hidden


def test_defaults_are_the_papers_and_settings_are_checked() -> None:
    cfg = DARTConfig()
    assert {"layer": cfg.layer, "keep": cfg.keep, "pivots": cfg.pivots, "text_pivots": cfg.text_pivots} == \
        PAPER["dart"]  # fmt: skip
    assert round(576 * cfg.keep) == 128  # the paper's LLaVA-1.5 budget
    with pytest.raises(ValueError, match=r"^DART layer K=6 is beyond the model's 6 layers"):
        pmod.convert(tiny_llama(num_layers=6), DARTConfig(layer=6))
    with pytest.raises(ValueError, match=">= 1"):
        DARTConfig(layer=0)
    with pytest.raises(ValueError, match="pivots >= 1"):
        DARTConfig(pivots=0)
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        DARTConfig(keep=1.5)


def test_generate_dart_on_a_dense_folder_equals_convert(tmp_path, capsys) -> None:
    """``pmod generate --method dart`` applies it on the fly, as pmod.convert would (answer and KV share)."""
    from test_cli_methods import PROMPT, reference_generate

    from pmod.cli import main
    from pmod.testing import tiny_llava_folder

    folder = tiny_llava_folder(str(tmp_path / "dense"), num_layers=6)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (230, 25, 25)).save(image)
    rc = main(["generate", "--model", folder, "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "6",
               "--method", "dart", "--dart-layer", "3", "--dart-keep", "0.3", "--dart-pivots", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    answer, share = reference_generate(Path(folder), DARTConfig(layer=3, keep=0.3, pivots=2), image)
    assert captured.out.strip() == answer
    assert f", {share})" in captured.err and share != "100.0%"


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_multimodal_backbones_equal_the_masked_reference(family: str) -> None:
    """Qwen-VL (M-RoPE; Qwen3-VL's per-head k norm and deepstack) and OneVision, images and a video, left padding:
    the compacted model against the reference run on what the dense model feeds its layers."""
    from test_backbones import build, vision_of

    from pmod.core.backbone import backbone_for
    from pmod.testing.reference import capture_decoder_inputs, reference_decoder_logits
    from pmod.testing.reference import reference_rules as model_reference_rules

    dense, batch, _ = build(family)
    model = pmod.convert(copy.deepcopy(dense), DARTConfig(layer=2, keep=0.5))
    decoder = backbone_for(dense).decoder(dense)
    captured = capture_decoder_inputs(dense, decoder, **batch)
    real, vision = batch["attention_mask"].bool(), vision_of(batch)
    rules = model_reference_rules(model)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(**batch).logits
        want = reference_decoder_logits(dense, decoder, rules, captured, real, vision)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert torch.equal(rec.processed[2][0] & vision, rules[2].kept)


@pytest.mark.parametrize("config", [DARTConfig(layer=2, keep=0.3), PDropConfig(layers=[2, 4, 6], keep=0.5)])
def test_llava_next_generate_batched_equals_rows_alone(config) -> None:
    """LLaVA-NeXT rows of unequal image sizes and text-only rows, left-padded, through generate() (which gives
    each row its own positions): each row generates what it generates alone."""
    model = pmod.convert(tiny_llava_next(num_layers=8), config)
    sizes = [(16, 32), (32, 32), None, (32, 16)]
    batch = llava_next_batch(model, [(3, 5), (2, 2), (6, 1), (4, 4)], sizes, "left")
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
               suppress_tokens=[IMAGE_TOKEN_ID])  # fmt: skip
    with torch.no_grad():
        together = model.generate(**batch, **gen)[:, -8:]
    image = 0
    for r, size in enumerate(sizes):
        real = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r : r + 1, real]}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if size is not None:
            row["pixel_values"] = batch["pixel_values"][image : image + 1]
            row["image_sizes"] = batch["image_sizes"][image : image + 1]
            image += 1
        with torch.no_grad():
            assert torch.equal(model.generate(**row, **gen)[0, -8:], together[r]), f"row {r}"
