"""Every routing method through the same core, against the independent reference of ``pmod.testing.reference``:
compacted execution, cached decoding, batching, save/load, and the analytic FLOPs against FlopCounterMode."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pmod
from pmod import FastVConfig, GammaMoDConfig, MoDConfig, PModConfig
from pmod.analysis.analytic_flops import counted_flops, estimate
from pmod.testing import (
    PAD_TOKEN_ID,
    greedy_steps,
    llava_batch,
    randomize_routers,
    routed_batch,
    tiny_llama,
    tiny_llava,
)
from pmod.testing.reference import reference_logits, reference_rules

#: One config per method on a 6-layer model; every one routes layers 1-5 in some way.
METHODS = {
    "pmod": PModConfig(schedule="explicit", ratios=[None, 0.9, 0.5, 0.25, 0.15, 0.5]),
    "mod": MoDConfig(ratio=0.5, layers=[1, 2, 4]),
    "gamma_mod": GammaMoDConfig(layers=[1, 2, 3, 5], skip_ratio=0.5),
    "fastv": FastVConfig(layer=2, keep=0.5),
}
ROWS = [(5, 23, False), (9, 11, True), (4, 0, False)]  # batch 3: unequal vision counts, scattered, no image


def routed(method: str, attn: str = "sdpa", seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense reference model with eager attention, converted copy with random routers under ``attn``)."""
    dense = tiny_llama(num_layers=6, attn_implementation="eager", seed=seed)
    model = pmod.convert(copy.deepcopy(dense), METHODS[method])
    randomize_routers(model, scale=3.0, seed=seed)
    model.set_attn_implementation(attn)
    return dense, model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compacted_equals_reference(method: str, padding_side: str, attn: str) -> None:
    dense, model = routed(method, attn)
    ids, am, vm = routed_batch(ROWS, padding_side)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_logits(dense, reference_rules(model), ids, am, vm)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    # Routing really happened: some routed layer processed fewer tokens than the row has.
    assert any(bool((m[0].sum(1) < real.sum(1)).any()) for m in rec.processed.values())


@pytest.mark.parametrize("method", METHODS)
def test_cached_greedy_decoding_equals_recomputation(method: str) -> None:
    """The cached decode against the reference recomputed over prompt + generated tokens (teacher-forced, with the
    method's own decode rule: gamma-MoD's threshold, FastV's prompt-time ranking)."""
    dense, model = routed(method)
    ids, am, vm = routed_batch(ROWS, "left", seed=2)
    new, logits = greedy_steps(model, ids, am, vm, steps=10)
    full = torch.cat([ids, new], dim=1)
    full_am = torch.cat([am, torch.ones_like(new)], dim=1)
    full_vm = torch.cat([vm, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        want = reference_logits(dense, reference_rules(model), full, full_am, full_vm, prompt_length=ids.shape[1])
    torch.testing.assert_close(logits, want[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=0)
    assert torch.equal(want[:, ids.shape[1] - 1 : -1].argmax(-1), new)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_rows_alone(method: str) -> None:
    _, model = routed(method)
    ids, am, vm = routed_batch(ROWS, "left", seed=4)
    together, _ = greedy_steps(model, ids, am, vm, steps=8)
    for r in range(len(ROWS)):
        real = am[r].bool()
        alone, _ = greedy_steps(model, ids[r : r + 1, real], am[r : r + 1, real], vm[r : r + 1, real], steps=8)
        assert torch.equal(alone[0], together[r]), f"row {r}"


@pytest.mark.parametrize("method", METHODS)
def test_llava_save_load_gives_identical_logits(method: str, tmp_path) -> None:
    model = pmod.convert(tiny_llava(num_layers=6), METHODS[method])
    randomize_routers(model, scale=3.0)
    batch = llava_batch(model, [(3, 5), (2, 2), (6, 1)], [True, True, False], "left")
    with torch.no_grad():
        want = model(**batch).logits
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["pmod_method"]
    assert stored["method"] == method and "pmod" not in json.loads((tmp_path / "config.json").read_text())
    loaded = pmod.load(tmp_path)
    assert type(pmod.get_method_config(loaded)) is type(METHODS[method])
    assert pmod.layer_ratios(loaded) == pmod.layer_ratios(model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)


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


def test_mod_llava_generation_cached_equals_use_cache_false() -> None:
    model = pmod.convert(tiny_llava(num_layers=8), MoDConfig())
    randomize_routers(model, scale=3.0)
    batch = llava_batch(model, [(3, 5), (2, 2), (6, 1)], [True, True, False], "left")
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **gen), model.generate(**batch, use_cache=False, **gen))


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


@pytest.mark.parametrize("method", METHODS)
def test_analytic_flops_equal_flop_counter(method: str) -> None:
    """``pmod flops`` counts what runs: FlopCounterMode over an eager forward (batch 1, no padding)."""
    _, model = routed(method, attn="eager")
    n_text, n_vision = 16, 32
    vision = torch.zeros(1, n_text + n_vision, dtype=torch.bool)
    vision[:, 8 : 8 + n_vision] = True
    ids = torch.randint(4, 128, (1, n_text + n_vision))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(input_ids=ids, vision_mask=vision, use_cache=False)
    report = estimate(model.config, METHODS[method], n_vision=n_vision, n_text=n_text)
    assert counted_flops(counter) == report.routed_flops
    assert report.routed_flops < report.dense_flops
