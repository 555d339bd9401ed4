"""VisionZip against its independent reference (``pmod.testing.reference_visionzip``): the [CLS] attention of the
feature layer picks the dominant tokens, the rest merge into contextual ones by key similarity, the decoder gets the
shortened sequence; cached decoding = recomputation, batched = rows alone, save/load, analytic FLOPs =
FlopCounterMode, and the one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pmod
from pmod import VisionZipConfig
from pmod.analysis.analytic_flops import estimate, flop_counter
from pmod.analysis.budget import at_budget, cost_ratio
from pmod.core.cache import cache_of
from pmod.core.errors import UserError
from pmod.testing import IMAGE_TOKEN_ID, PAD_TOKEN_ID, llava_next_batch, tiny_llama, tiny_llava, tiny_llava_next
from pmod.testing.reference_visionzip import visionzip_reference_logits

DOMINANT, CONTEXTUAL = 6, 3
CONFIG = VisionZipConfig(dominant=DOMINANT, contextual=CONTEXTUAL)
PER_IMAGE, KEPT = 64, DOMINANT + CONTEXTUAL  # the tiny tower: 8 x 8 patches
#: (text before, images, text after): unequal image counts, two images in a row, a row without one.
ROWS = [(3, 1, 5), (2, 2, 2), (6, 0, 1), (1, 1, 9)]


def models(attn: str = "sdpa", config: VisionZipConfig = CONFIG) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llava(num_layers=4, attn_implementation=attn)
    return dense, pmod.convert(copy.deepcopy(dense), config)


def batch_of(rows: list[tuple[int, int, int]], padding_side: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids with ``PER_IMAGE`` placeholders per image (one text token between two images), mask, pixels."""
    g = torch.Generator().manual_seed(seed)
    made = []
    for before, images, after in rows:
        parts = [torch.randint(4, 128, (before,), generator=g)]
        for i in range(images):
            if i:
                parts.append(torch.randint(4, 128, (1,), generator=g))
            parts.append(torch.full((PER_IMAGE,), IMAGE_TOKEN_ID))
        made.append(torch.cat([*parts, torch.randint(4, 128, (after,), generator=g)]))
    width = max(len(r) for r in made)
    ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(made):
        start = width - len(row) if padding_side == "left" else 0
        ids[r, start : start + len(row)], mask[r, start : start + len(row)] = row, 1
    n_images = sum(images for _, images, _ in rows)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(n_images, 3, 32, 32, generator=g)}


def kept_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B, T]: the real tokens the decoder sees (the first KEPT placeholders of each image, all text)."""
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    rank = (image.cumsum(1) - 1) % PER_IMAGE
    return batch["attention_mask"].bool() & ~(image & (rank >= KEPT))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_equal_the_reference(padding_side: str, attn: str) -> None:
    dense, model = models(attn)
    batch = batch_of(ROWS, padding_side)
    with torch.no_grad():
        got = model(**batch).logits
        want = visionzip_reference_logits(dense, batch, DOMINANT, CONTEXTUAL)
    assert got.shape[:2] == batch["input_ids"].shape  # logits stand at the positions of the tokens given
    keep = kept_positions(batch)
    for r, row in enumerate(want):
        assert row.shape[0] == int(keep[r].sum())
        torch.testing.assert_close(got[r, keep[r]], row, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [VisionZipConfig(dominant=1, contextual=5), VisionZipConfig(dominant=20,
                                    contextual=0), VisionZipConfig(dominant=30, contextual=34)])  # fmt: skip
def test_other_settings_equal_the_reference(config: VisionZipConfig) -> None:
    """Only [CLS] dominant, no contextual token, and every token kept (targets with nothing merged in)."""
    dense, model = models(config=config)
    batch = batch_of(ROWS[:2], "right", seed=5)
    with torch.no_grad():
        got = model(**batch).logits
        want = visionzip_reference_logits(dense, batch, config.dominant, config.contextual)
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    keep = batch["attention_mask"].bool() & ~(image & ((image.cumsum(1) - 1) % PER_IMAGE >= config.kept))
    for r, row in enumerate(want):
        torch.testing.assert_close(got[r, keep[r]], row, atol=2e-5, rtol=1e-4)


def test_cached_generation_equals_recomputation() -> None:
    _, model = models()
    batch = batch_of(ROWS, "left", seed=2)
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
               suppress_tokens=[IMAGE_TOKEN_ID])  # fmt: skip
    with torch.no_grad():
        cached = model.generate(**batch, **gen)
        recomputed = model.generate(**batch, **gen, use_cache=False)
        assert torch.equal(cached[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # the prompt as given
        assert torch.equal(cached, recomputed)
        full = {**batch, "input_ids": cached, "attention_mask": torch.cat(
            [batch["attention_mask"], torch.ones_like(cached[:, -8:])], dim=1)}  # fmt: skip
        logits = model(**full, use_cache=False).logits
    width = batch["input_ids"].shape[1]
    assert torch.equal(logits[:, width - 1 : -1].argmax(-1), cached[:, width:])


def test_batched_equals_rows_alone() -> None:
    _, model = models()
    batch = batch_of(ROWS, "left", seed=4)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
               suppress_tokens=[IMAGE_TOKEN_ID])  # fmt: skip
    with torch.no_grad():
        together = model.generate(**batch, **gen)[:, -6:]
    image = 0
    for r, (_, images, _) in enumerate(ROWS):
        real = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r : r + 1, real]}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if images:
            row["pixel_values"] = batch["pixel_values"][image : image + images]
            image += images
        with torch.no_grad():
            assert torch.equal(model.generate(**row, **gen)[0, -6:], together[r]), f"row {r}"


def test_cache_and_labels_are_shortened() -> None:
    _, model = models()
    batch = batch_of(ROWS, "right", seed=3)
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN_ID, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels.masked_fill(batch["attention_mask"] == 0, -100), use_cache=True)
    keep = kept_positions(batch)
    assert cache_of(out).get_seq_length() == int(keep.sum(1).max())
    # The loss is the shortened sequence's: each kept token predicts the next kept one (dropped placeholders and
    # padding carry no label).
    logits = torch.cat([out.logits[r, keep[r]][:-1] for r in range(len(ROWS))])
    targets = torch.cat([labels[r, keep[r]][1:] for r in range(len(ROWS))])
    want = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_logits(tmp_path) -> None:
    _, model = models()
    batch = batch_of(ROWS, "left", seed=6)
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["pmod_method"]
    assert stored == {"method": "visionzip", "settings": {"dominant": DOMINANT, "contextual": CONTEXTUAL}}
    loaded = pmod.load(tmp_path)
    assert pmod.get_method_config(loaded) == CONFIG
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


def language_model_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """What FlopCounterMode counts in the decoder and the LM head (not the tower, the projector, rotary tables)."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        model(**batch, use_cache=False)
    counts = counter.get_flop_counts()
    prefixes = ("LlavaForConditionalGeneration.model.language_model", "LlavaForConditionalGeneration.lm_head")
    total = sum(sum(ops.values()) for name, ops in counts.items() if name in prefixes)
    rotary = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith("rotary_emb"))
    return total - rotary


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_analytic_flops_equal_flop_counter(attn: str) -> None:
    dense, model = models(attn)
    batch = batch_of([(7, 1, 9)], "left", seed=1)
    report = estimate(model.config, CONFIG, n_vision=PER_IMAGE, n_text=16)
    assert language_model_flops(model, batch) == report.routed_flops
    assert language_model_flops(dense, batch) == report.dense_flops
    assert report.routed_layers[0].processed == 16 + KEPT and report.routed_kv_bytes < report.dense_kv_bytes


def test_defaults_budget_and_refusals() -> None:
    cfg = VisionZipConfig()
    assert (cfg.dominant, cfg.contextual, cfg.trainable) == (54, 10, False)
    report = estimate(pmod.analysis.dims.presets()["llava-1.5-7b"].dims, cfg, n_vision=576, n_text=64)
    assert [c.processed for c in report.routed_layers] == [128] * 32  # every layer sees 54 + 10 vision tokens
    config = tiny_llava().config
    chosen = at_budget(cfg, config, 0.5, n_vision=PER_IMAGE, n_text=16)
    assert isinstance(chosen.dominant, int) and chosen.contextual == 10

    def miss(dominant: int) -> float:
        return abs(cost_ratio(VisionZipConfig(dominant=dominant), config, n_vision=PER_IMAGE, n_text=16) - 0.5)

    assert miss(chosen.dominant) < 0.02 and miss(chosen.dominant) <= min(miss(chosen.dominant - 1),
                                                                         miss(chosen.dominant + 1))  # fmt: skip
    with pytest.raises(ValueError, match=r"^VisionZip needs dominant >= 1"):
        VisionZipConfig(dominant=0)


def test_towers_without_cls_are_refused_in_one_line() -> None:
    """SigLIP (OneVision) and Qwen-VL's towers have no [CLS] token to rank by; the authors' code covers CLIP."""
    from test_backbones import build

    for family in ("llava_onevision", "qwen2_5_vl"):
        dense, _, _ = build(family)
        with pytest.raises(UserError, match=rf"; {family.replace('_5', '')} models have none \(SigLIP and Qwen-VL"):
            pmod.convert(dense, VisionZipConfig(dominant=4, contextual=2))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: tiny_llama(num_layers=2), r"^VisionZip ranks an image's tokens by the \[CLS\] attention .*"
         r"decoder models have none"),
        (lambda: tiny_llava(num_layers=2), r"^VisionZip keeps dominant \+ contextual = 60 \+ 10 tokens per image, "
         r"more than the 64 of this model's images; lower them$"),
    ],
)  # fmt: skip
def test_unsupported_models_are_refused_in_one_line(build, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        pmod.convert(build(), VisionZipConfig(dominant=60, contextual=10))
    assert "\n" not in str(err.value)


def test_placeholders_of_no_whole_image_are_refused() -> None:
    _, model = models()
    batch = batch_of([(3, 1, 5)], "left")
    batch["input_ids"] = batch["input_ids"][:, 1:]
    batch["input_ids"][0, 2] = 7  # one placeholder fewer
    batch["attention_mask"] = batch["attention_mask"][:, 1:]
    with pytest.raises(UserError, match=r"^VisionZip: a row holds \[63\] image placeholders"):
        model(**batch)


def test_ablation_rows_meet_pmod_tflops_and_scale_the_paper() -> None:
    """``visionzip``: the dominant count whose TFLOPs come closest to p-MoD's (no neighbour closer);
    ``visionzip_paper``: 54 + 10 of 576 at the same share of the image's tokens."""
    from pmod.analysis.dims import LMDims, presets
    from pmod.experiments.ablate_variants import Workload, visionzip_at_budget, visionzip_paper

    assert (visionzip_paper(576).dominant, visionzip_paper(576).contextual) == (54, 10)
    assert (visionzip_paper(64).dominant, visionzip_paper(64).contextual) == (6, 1)
    dims = LMDims.from_config(tiny_llava(num_layers=12).config)
    for workload in (Workload(dims, 64, 15), Workload(presets()["llava-1.5-7b"].dims, 576, 64)):
        target = workload.tflops(pmod.PModConfig())
        chosen = visionzip_at_budget(workload, pmod.PModConfig())
        assert chosen.contextual == visionzip_paper(workload.n_vision).contextual

        misses = [abs(workload.tflops(VisionZipConfig(dominant=chosen.dominant + d, contextual=chosen.contextual))
                      - target) for d in (0, -1, 1)]  # fmt: skip
        assert misses[0] <= min(misses[1:]) and misses[0] < 0.02 * target


def test_generate_visionzip_on_a_dense_folder_equals_convert(tmp_path, capsys) -> None:
    """``pmod generate --method visionzip`` applies it on the fly, as pmod.convert would; the KV share it prints is
    against what the dense model caches for the prompt as given (64 placeholders), not the shortened one."""
    from PIL import Image
    from test_cli_methods import PROMPT, VICUNA_SYSTEM, generate_on_the_fly
    from transformers import AutoProcessor

    err, _ = generate_on_the_fly(tmp_path, capsys, 4, VisionZipConfig(dominant=5, contextual=2),
                                 ["--method", "visionzip", "--visionzip-dominant", "5", "--visionzip-contextual", "2"])
    folder, image = tmp_path / "dense", tmp_path / "red.png"
    processor = AutoProcessor.from_pretrained(folder)
    prompt = len(processor(text=[f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:"],
                           images=[Image.open(image).convert("RGB")])["input_ids"][0])  # fmt: skip
    vision = json.loads((tmp_path / "dense" / "config.json").read_text())["vision_config"]
    per_image = (vision["image_size"] // vision["patch_size"]) ** 2  # this folder's tower: 16
    dense, kept = prompt + 6 - 1, prompt - (per_image - 7) + 6 - 1  # generate caches all but the last token
    assert f"{kept / dense:.1%})" in err


def test_measured_kv_bytes_count_the_shortened_rows() -> None:
    """``pmod eval`` measures each row's KV bytes with the decoder's own padding mask (``decoder_attention_mask``):
    after a VisionZip forward, each row holds its text and ``KEPT`` tokens per image, not the placeholders given."""
    from pmod.core.convert import decoder_attention_mask
    from pmod.eval.cost import row_kv_bytes

    _, model = models()
    batch = batch_of(ROWS, "left", seed=7)
    with torch.no_grad():
        cache = cache_of(model(**batch, use_cache=True))
    size = pmod.kv_cache_bytes(cache)
    per_token = size.layer_bytes[0] // (len(ROWS) * size.layer_slots[0])
    want = [int(k) * per_token * len(size.layer_bytes) for k in kept_positions(batch).sum(1)]
    assert row_kv_bytes(cache, decoder_attention_mask(model, batch["attention_mask"])) == want
    with torch.no_grad():
        model(input_ids=batch["input_ids"][2:3, -7:])  # a text-only call: the mask given is the decoder's
    mask = torch.ones(1, 7, dtype=torch.long)
    assert decoder_attention_mask(model, mask) is mask


NEXT_CONFIG = VisionZipConfig(dominant=4, contextual=2)  # of 16 patches per view
NEXT_SIZES = [(16, 32), (32, 32), None, (32, 16)]  # 1x2, 2x2 and 2x1 tiles after the base view, a text-only row


def next_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llava_next(num_layers=4)
    return dense, pmod.convert(copy.deepcopy(dense), NEXT_CONFIG)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_llava_next_equals_the_reference(padding_side: str) -> None:
    """Per view, as the authors do: the base view's tokens, the tiles' dominant patches in the order of the whole
    tile grid, the tiles' [CLS] tokens, their contextual tokens; 6 tokens per view reach the decoder."""
    dense, model = next_models()
    batch = llava_next_batch(dense, [(3, 5), (2, 2), (6, 1), (4, 4)], NEXT_SIZES, padding_side)
    with torch.no_grad():
        got = model(**batch).logits
        want = visionzip_reference_logits(dense, batch, NEXT_CONFIG.dominant, NEXT_CONFIG.contextual)
    views = [1 + 2, 1 + 4, 0, 1 + 2]
    for r, row in enumerate(want):
        real = batch["attention_mask"][r].bool()
        text = int((real & (batch["input_ids"][r] != IMAGE_TOKEN_ID)).sum())
        assert row.shape[0] == text + NEXT_CONFIG.kept * views[r]
        image = batch["input_ids"][r] == IMAGE_TOKEN_ID  # one image per row: it keeps its first placeholders
        keep = real & ~(image & ((image.cumsum(0) - 1) >= NEXT_CONFIG.kept * views[r]))
        torch.testing.assert_close(got[r, keep], row, atol=2e-5, rtol=1e-4)


def test_a_deep_copy_runs_on_its_own_hooks() -> None:
    """``copy.deepcopy`` of a converted model (LLaVA-NeXT's packing too) gives the same logits, and the copy's
    hooks are its own: the original model's weights changed afterwards do not reach it."""
    dense, model = next_models()
    batch = llava_next_batch(dense, [(3, 5), (2, 2)], [(16, 32), (32, 32)], "left")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        want = model(**batch).logits
        torch.testing.assert_close(copied(**batch).logits, want, atol=0, rtol=0)
        for p in model.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(copied(**batch).logits, want, atol=0, rtol=0)


def test_llava_next_generate_batched_equals_rows_alone_and_recomputation() -> None:
    dense, model = next_models()
    batch = llava_next_batch(dense, [(3, 5), (2, 2), (6, 1), (4, 4)], NEXT_SIZES, "left")  # the dense placeholders
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,
               suppress_tokens=[IMAGE_TOKEN_ID])  # fmt: skip
    with torch.no_grad():
        together = model.generate(**batch, **gen)
        assert torch.equal(together, model.generate(**batch, **gen, use_cache=False))
    image = 0
    for r, size in enumerate(NEXT_SIZES):
        real = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r : r + 1, real]}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if size is not None:
            row["pixel_values"] = batch["pixel_values"][image : image + 1]
            row["image_sizes"] = batch["image_sizes"][image : image + 1]
            image += 1
        with torch.no_grad():
            assert torch.equal(model.generate(**row, **gen)[0, -6:], together[r, -6:]), f"row {r}"


def test_analytic_counts_views_of_576_tokens() -> None:
    """LLaVA-NeXT's 2880 vision tokens are five views of 576: each keeps 54 + 10; LLaVA-1.5's two images, two."""
    dims = pmod.analysis.dims.presets()["llava-next-7b"].dims
    assert estimate(dims, VisionZipConfig(), n_vision=2880, n_text=64).routed_layers[0].processed == 64 + 5 * 64
    assert estimate(dims, VisionZipConfig(), n_vision=1152, n_text=64).routed_layers[0].processed == 64 + 2 * 64
    assert estimate(dims, VisionZipConfig(), n_vision=40, n_text=64).routed_layers[0].processed == 64 + 40


def test_viz_refuses_visionzip_in_one_line(tmp_path, capsys) -> None:
    """VisionZip routes no decoder layer: ``pmod viz`` has nothing to draw and says so (it raised a traceback)."""
    from PIL import Image

    from pmod.cli import main
    from pmod.testing import tiny_llava_folder

    folder = tiny_llava_folder(str(tmp_path / "dense"), num_layers=2)
    Image.new("RGB", (32, 32), (230, 25, 25)).save(tmp_path / "red.png")
    rc = main(["viz", "--model", folder, "--image", str(tmp_path / "red.png"), "--prompt", "What?", "--out",
               str(tmp_path / "viz"), "--method", "visionzip"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("pmod viz: error: pmod viz shows the tokens each routed decoder layer keeps; "
                                      "VisionZip routes no layer")  # fmt: skip


def test_stopping_criteria_see_the_prompt_as_given() -> None:
    """A criterion that reads ``input_ids[:, prompt_length:]`` (pmod eval's stop strings) sees the new tokens after
    the prompt as given, not after the shortened prompt generate runs on."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    _, model = models()
    batch = batch_of(ROWS, "left", seed=8)
    width, seen = batch["input_ids"].shape[1], []

    def stop_after_three(input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        seen.append(input_ids.clone())
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - width >= 3)

    def record(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        processed.append(input_ids.clone())
        return scores

    processed: list[torch.Tensor] = []
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(**batch, **gen, stopping_criteria=StoppingCriteriaList([stop_after_three]),
                             logits_processor=LogitsProcessorList([record]))  # fmt: skip
    assert out.shape[1] == width + 3 and torch.equal(seen[-1], out)
    assert [p.shape[1] for p in processed] == [width, width + 1, width + 2] and torch.equal(processed[-1], out[:, :-1])


def test_demo_evaluation_costs_visionzip_with_its_own_analytic_cost(tmp_path) -> None:
    """The ablation's evaluation reports a VisionZip model's own analytic TFLOPs and retention, not dense's (it
    routes no layer, and the evaluation took such a model for a dense one)."""
    from pmod.data import synth
    from pmod.experiments.demo_runs import evaluate_model
    from pmod.io.model_folder import load_model
    from pmod.testing import tiny_llava_folder

    folder = tiny_llava_folder(str(tmp_path / "dense"), num_layers=2)
    _, test = synth.generate(tmp_path / "data", 20, seed=0)
    records = [r for r in json.loads(test.read_text()) if r.get("image")][:2]
    config = VisionZipConfig(dominant=3, contextual=1)
    model, processor = load_model(folder, "cpu", "pmod test", config)
    result = evaluate_model(model, processor, tmp_path / "data", records, batch_size=2)
    report = estimate(model.config, config, n_vision=result["n_vision"], n_text=result["n_text"], dtype="float32")
    assert result["prefill_tflops"] == report.routed_flops / 1e12 < report.dense_flops / 1e12
    assert result["mean_retention"] == pytest.approx(4 / result["n_vision"])
