"""Every routing method on every backbone family: the checks each method x backbone cell must pass, against the
independent references of ``pmod.testing.reference`` (compacted execution = the masked reference, with the kept
tokens counted by hand; cached decoding = the reference recomputed; a batch = its rows alone; save/load; the
analytic FLOPs = FlopCounterMode). One tiny model and batch per family (``pmod.testing.families``), one small
setting per method (``METHODS``). What is particular to a method or a backbone stays in its own test file.

A method joins the matrix by its registry name and one ``METHODS`` entry; a cell that cannot run is listed in
``NOT_GENERATED`` with the reason, a family whose other checks would repeat another's path in pmod in
``REFERENCE_ONLY`` (``test_every_cell_is_run_or_listed`` holds the registry and the supported families to that).
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import pmod
from pmod.analysis.analytic_flops import counted_flops, estimate, flop_counter
from pmod.core.backbone import backbone_for, supported_model_types
from pmod.core.config import MethodConfig, method_class, method_names
from pmod.testing import greedy_steps, randomize_routers
from pmod.testing.families import DECODERS, TinyInputs, tiny_inputs, tiny_model, vision_token_ids
from pmod.testing.reference import (
    DecoderInputs,
    capture_decoder_inputs,
    reference_decoder_logits,
    reference_logits,
    reference_rules,
)


@dataclass(frozen=True)
class Setting:
    """A method's small setting on the 4-layer tiny models, routing several layers in its own way.

    ``declared``: the values the reference takes instead of the paper's (``reference_rules(model, **declared)``).
    ``kept``: (vision tokens of a row, layer) -> how many of them the layer keeps, by hand (None: not counted); the
    rows' text tokens are then all processed.
    """

    settings: dict[str, Any]
    declared: dict[str, Any] = field(default_factory=dict)
    kept: Callable[[int, int], int | None] | None = None


NUM_LAYERS = 4
PMOD_RATIOS = [None, 0.9, 0.25, 0.5]
PDROP_LAYERS, PDROP_KEEP = [2, 3], 0.6  # floor(n 0.6^s) differs from flooring stage by stage (23: 13, 8 not 7)


def _pdrop_kept(n: int, layer: int) -> int:
    stage = sum(layer >= start for start in PDROP_LAYERS)
    return math.floor(n * PDROP_KEEP**stage)


#: One entry per registered method (``method_names()``).
METHODS = {
    "pmod": Setting(
        {"schedule": "explicit", "ratios": PMOD_RATIOS}, kept=lambda n, layer: math.floor(n * PMOD_RATIOS[layer])
    ),
    "mod": Setting({"ratio": 0.5, "layers": [1, 3]}, kept=lambda n, layer: math.floor(n * 0.5)),
    # Without question tokens every prompt text token is processed and the vision tokens are routed.
    "gamma_mod": Setting({"layers": [1, 2, 3], "skip_ratio": 0.5}, kept=lambda n, layer: math.floor(n * 0.5)),
    "fastv": Setting({"layer": 2, "keep": 0.5}, kept=lambda n, layer: round(n * 0.5) if layer >= 2 else None),
    "pdrop": Setting({"layers": PDROP_LAYERS, "keep": PDROP_KEEP}, {"keep": PDROP_KEEP}, kept=_pdrop_kept),
    # 23 vision tokens: budget 10 = 2 pivots + 4 pivots x 2
    "dart": Setting(
        {"layer": 2, "keep": 0.45, "pivots": 2, "text_pivots": 2},
        {"pivots": 2, "text_pivots": 2},
        kept=lambda n, layer: round(n * 0.45) if layer >= 2 else None,
    ),
    # Acts before the decoder (it shortens the sequence; no layer is routed), so the matrix's per-layer checks do not
    # apply: NOT_GENERATED below.
    "visionzip": Setting({"dominant": 4, "contextual": 2}),
}
FAMILIES = supported_model_types()
#: (method, family) cells the matrix leaves out, with the reason.
NOT_GENERATED: dict[tuple[str, str], str] = {
    ("visionzip", f): (
        "VisionZip routes no decoder layer: tests/test_visionzip.py checks it against its own reference, cached "
        "decoding and rows alone (llava, llava_next), save/load and FlopCounterMode (llava)"
        if f in ("llava", "llava_next")
        else "no CLIP [CLS] tower: convert refuses it in one line (tests/test_visionzip.py)"
    )
    for f in supported_model_types()
}
CELLS = [(m, f) for m in METHODS for f in FAMILIES if (m, f) not in NOT_GENERATED]
#: Families whose cells run the compacted-vs-reference check only: their decoding, save/load and FLOPs would repeat
#: another family's code path in pmod, at the cost of the slowest checks.
REFERENCE_ONLY = {
    "mistral": "Llama's decoder layer under another name; pmod's decoder adapter runs it as llama's",
    "qwen2": "Llama's decoder layer with biased q/k/v projections, which pmod calls as llama's (inside the Linear)",
    "qwen3": "a bare decoder as llama's; its layer (q/k norms) is Qwen3-VL's, whose cells run every check",
}
FULL_CELLS = [(m, f) for m, f in CELLS if f not in REFERENCE_ONLY]
#: The bare Llama also runs right-padded and with eager attention (the routed layers' other paths).
VARIANTS = {"llama": [("left", "sdpa"), ("right", "sdpa"), ("left", "eager"), ("right", "eager")]}
#: Greedy steps decoded after the prompt (recomputation check), and by each row alone (batch check).
STEPS, ROW_STEPS = 10, 8


def config_of(method: str) -> MethodConfig:
    return method_class(method)(**METHODS[method].settings)


@functools.cache
def dense(family: str) -> torch.nn.Module:
    """The family's tiny dense model, eager (the references read attention probabilities), its norm weights away
    from 1 (a path that skipped one would differ)."""
    model = tiny_model(family, num_layers=NUM_LAYERS, attn="eager")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=g) + 0.5)
    return model


@functools.cache
def routed(method: str, family: str) -> torch.nn.Module:
    """The dense model converted with the method's setting, random non-zero routers, sdpa."""
    model = pmod.convert(copy.deepcopy(dense(family)), config_of(method))
    randomize_routers(model, scale=3.0)
    model.set_attn_implementation("sdpa")
    return model


@functools.cache
def inputs(family: str, padding_side: str = "left", seed: int = 0) -> TinyInputs:
    return tiny_inputs(dense(family), padding_side, seed)


class Recorded:
    """A reference rule that keeps what it decided per layer (``keeps``), to compare with what pmod processed."""

    def __init__(self, rule: Any, idx: int, keeps: dict[int, torch.Tensor]) -> None:
        self.rule, self.idx, self.keeps = rule, idx, keeps

    def decide(self, layer: torch.nn.Module, idx: int, x: torch.Tensor, ctx: Any) -> Any:
        decision = self.rule.decide(layer, idx, x, ctx)
        self.keeps[idx] = decision[0]
        return decision

    def __getattr__(self, name: str) -> Any:
        return getattr(self.rule, name)


@functools.cache
def captured(family: str, padding_side: str) -> DecoderInputs:
    """What the family's dense model feeds its decoder layers for its batch (the same for every method)."""
    base = dense(family)
    return capture_decoder_inputs(base, backbone_for(base).decoder(base), **inputs(family, padding_side).batch)


def reference(method: str, family: str, batch: dict, vision: torch.Tensor, prompt_length: int | None = None,
              keeps: dict[int, torch.Tensor] | None = None, layer_inputs: DecoderInputs | None = None,
              ) -> torch.Tensor:  # fmt: skip
    """Logits of the family's dense model with the reference rules of the converted model's layers (a multimodal
    model's from what its dense model feeds the decoder layers: ``layer_inputs``, else captured here)."""
    rules = reference_rules(routed(method, family), **METHODS[method].declared)
    if keeps is not None:
        rules = {i: Recorded(rule, i, keeps) for i, rule in rules.items()}
    base, real = dense(family), batch["attention_mask"].bool()
    with torch.no_grad():
        if family in DECODERS:
            return reference_logits(base, rules, batch["input_ids"], batch["attention_mask"], vision,
                                    prompt_length=prompt_length, position_ids=batch.get("position_ids"))  # fmt: skip
        decoder = backbone_for(base).decoder(base)
        layer_inputs = layer_inputs or capture_decoder_inputs(base, decoder, **batch)
        return reference_decoder_logits(base, decoder, rules, layer_inputs, real, vision, prompt_length)


def reference_params() -> list:
    return [pytest.param(m, f, side, attn, id=f"{m}-{f}-{side}-{attn}")
            for m, f in CELLS for side, attn in VARIANTS.get(f, [("left", "sdpa")])]  # fmt: skip


@pytest.mark.parametrize(("method", "family", "padding_side", "attn"), reference_params())
def test_compacted_equals_the_reference(method: str, family: str, padding_side: str, attn: str) -> None:
    """The compacted model's logits are the masked reference's, it processes the tokens the reference keeps, and
    those are as many as the method's rule says (by hand), all text included."""
    model, tiny = routed(method, family), inputs(family, padding_side)
    keeps: dict[int, torch.Tensor] = {}
    model.set_attn_implementation(attn)
    try:
        with torch.no_grad(), pmod.record_routing(model) as rec:
            got = model(**tiny.batch).logits
        with torch.no_grad():  # what generate(use_cache=False) runs at every step
            assert torch.equal(model(**tiny.batch, use_cache=False).logits, got)
    finally:
        model.set_attn_implementation("sdpa")
    layer_inputs = None if family in DECODERS else captured(family, padding_side)
    want = reference(method, family, tiny.batch, tiny.vision, keeps=keeps, layer_inputs=layer_inputs)
    real, vision = tiny.batch["attention_mask"].bool(), tiny.vision
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert set(rec.processed) and set(rec.processed) <= set(keeps)
    for layer, keep in keeps.items():  # a layer pmod does not record routes nothing (FastV's, DART's scoring layer)
        processed = rec.processed[layer][0] if layer in rec.processed else real
        assert torch.equal(processed & real, keep & real), layer
    # Routing really happened: some routed layer processed fewer tokens than the row has.
    assert any(bool((m[0].sum(1) < real.sum(1)).any()) for m in rec.processed.values())
    count = METHODS[method].kept
    for layer in rec.processed if count is not None else []:
        want_kept = [count(int(n), layer) for n in vision.sum(1)]
        processed = rec.processed[layer][0]
        assert (processed & vision).sum(1).tolist() == want_kept, layer
        assert torch.equal(processed & real & ~vision, real & ~vision), layer


def greedy(model: torch.nn.Module, batch: dict, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, steps], their logits [B, steps, V]) of greedy cached decoding, each row at its own positions:
    a bare decoder stepped by hand (positions as ``generate()`` numbers them), a multimodal model by ``generate()``
    with its vision tokens suppressed (a generated one has no image)."""
    if "vision_mask" in batch:
        return greedy_steps(model, batch["input_ids"], batch["attention_mask"], batch["vision_mask"], steps,
                            own_positions=True)  # fmt: skip
    gen = dict(max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
               return_dict_in_generate=True, suppress_tokens=vision_token_ids(model))  # fmt: skip
    with torch.no_grad():
        out = model.generate(**batch, **gen)
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@functools.cache
def decoded(method: str, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cell's batch decoded greedily, each row at its own positions (one run serves both decoding checks)."""
    return greedy(routed(method, family), inputs(family, seed=2).batch, STEPS)


def extended(batch: dict, new: torch.Tensor) -> dict:
    """The batch with the generated tokens appended: prompt + answer as one sequence (text, no vision)."""
    out = dict(batch, input_ids=torch.cat([batch["input_ids"], new], 1),
               attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(new)], 1))  # fmt: skip
    for key in ("vision_mask", "mm_token_type_ids"):
        if key in batch:
            out[key] = torch.cat([batch[key], torch.zeros_like(new, dtype=batch[key].dtype)], 1)
    return out


@pytest.mark.parametrize(("method", "family"), FULL_CELLS)
def test_cached_greedy_decoding_equals_recomputation(method: str, family: str) -> None:
    """The cached decode against the reference recomputed over prompt + generated tokens (teacher-forced, with the
    method's own decode rule: gamma-MoD's threshold, the pruning methods' prompt-time ranking)."""
    tiny = inputs(family, seed=2)
    new, logits = decoded(method, family)
    full = extended(tiny.batch, new)
    if "image_grid_thw" not in full:  # the positions the decode had (Qwen-VL's M-RoPE: the model's own)
        full["position_ids"] = (full["attention_mask"].cumsum(1) - 1).clamp(min=0)
    vision = torch.cat([tiny.vision, torch.zeros_like(new, dtype=torch.bool)], 1)
    prompt = tiny.batch["input_ids"].shape[1]
    want = reference(method, family, full, vision, prompt_length=prompt)[:, prompt - 1 : -1]
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    if family not in DECODERS:  # generate() took the argmax among the tokens it did not suppress
        want[..., vision_token_ids(dense(family))] = float("-inf")
    assert torch.equal(want.argmax(-1), new)


@pytest.mark.parametrize(("method", "family"), FULL_CELLS)
def test_batch_decodes_as_its_rows_alone(method: str, family: str) -> None:
    """Rows of unequal vision counts (and none), left-padded: each row decodes what it decodes alone."""
    model, tiny = routed(method, family), inputs(family, seed=2)
    together, _ = decoded(method, family)  # greedy: its first ROW_STEPS are an 8-step run's
    for r, row in enumerate(tiny.rows):
        alone, _ = greedy(model, row, ROW_STEPS)
        assert torch.equal(alone[0], together[r, :ROW_STEPS]), f"row {r}"


@pytest.mark.parametrize(("method", "family"), FULL_CELLS)
def test_save_load_gives_the_same_model(method: str, family: str, tmp_path, monkeypatch) -> None:
    """config.json holds the method and its settings (not pmod 0.1's "pmod" key); ``pmod.load`` gives the same
    class, settings, layer ratios, weights and logits, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, batch = routed(method, family), inputs(family).batch
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert "pmod" not in stored and stored["pmod_method"]["method"] == method
    # Every field: the matrix's settings, the rest the config's defaults.
    assert stored["pmod_method"]["settings"] == {**method_class(method)().to_dict(), **METHODS[method].settings}
    loaded = pmod.load(tmp_path)
    assert type(loaded) is type(model) and pmod.get_method_config(loaded) == config_of(method)
    assert pmod.layer_ratios(loaded) == pmod.layer_ratios(model)
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model(**batch).logits)


@functools.cache
def counted(model: torch.nn.Module, attn: str, family: str) -> int:
    """FLOPs counted over one forward of the family's first row alone (batch 1, no padding) under ``attn``."""
    model.set_attn_implementation(attn)
    counter = flop_counter()  # FlopCounterMode, CPU sdpa included
    try:
        with torch.no_grad(), counter:
            model(**inputs(family).rows[0], use_cache=False)
    finally:
        model.set_attn_implementation("eager" if model is dense(family) else "sdpa")
    return counted_flops(counter)


def flops_params() -> list:
    """Every full cell with eager attention (torch counts its matmuls); the bare Llama with sdpa too (pmod's counter
    adds CPU sdpa's, which torch's counts as 0)."""
    return [pytest.param(m, f, attn, id=f"{m}-{f}-{attn}") for m, f in FULL_CELLS
            for attn in (["eager", "sdpa"] if f == "llama" else ["eager"])]  # fmt: skip


@pytest.mark.parametrize(("method", "family", "attn"), flops_params())
def test_analytic_flops_equal_the_flop_counter(method: str, family: str, attn: str) -> None:
    """``pmod flops`` counts what runs: what routing saves analytically is what FlopCounterMode counts less (the
    tower and the rest are common); a bare decoder's count is the analytic one itself."""
    model, row = routed(method, family), inputs(family).rows[0]
    n_vision = int(inputs(family).vision[0].sum())
    report = estimate(model.config, config_of(method), n_vision=n_vision, n_text=row["input_ids"].shape[1] - n_vision)
    saved = counted(dense(family), attn, family) - counted(model, attn, family)
    assert saved == report.dense_flops - report.routed_flops
    assert report.routed_flops < report.dense_flops
    if family in DECODERS:
        assert counted(model, attn, family) == report.routed_flops


def test_every_cell_is_run_or_listed() -> None:
    """A method registered (or a backbone family supported) later joins the matrix or is listed with a reason."""
    assert list(METHODS) == method_names()
    assert all(m in METHODS and f in FAMILIES and reason for (m, f), reason in NOT_GENERATED.items())
    assert len(CELLS) + len(NOT_GENERATED) == len(method_names()) * len(supported_model_types())
    assert all(f in FAMILIES and reason for f, reason in REFERENCE_ONLY.items())
    in_cells = {m for m, _ in CELLS}
    assert len(FULL_CELLS) == len(CELLS) - len(in_cells) * len(REFERENCE_ONLY)
