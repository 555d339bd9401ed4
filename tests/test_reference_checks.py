"""Runs that used to be checked only for running (finite bf16 logits, renumbered positions that "differ") against a
reference: the bf16 compacted model against the fp32 dense reference within bf16's own error, and gamma-MoD's
``renumber_positions`` against the reference run with the original code's positions (0..K-1 over the processed
tokens of each row)."""

from __future__ import annotations

import copy

import pytest
import torch

import pmod
from pmod import GammaMoDConfig, PModConfig
from pmod.testing import randomize_routers, routed_batch, tiny_llama
from pmod.testing.reference import reference_logits, reference_rules

#: How far the bf16 model may be from the fp32 reference, in units of the bf16 reference's own distance from it (the
#: same computation, written plainly, in bf16): the slack of benchmarks/gpu_correctness.py.
BF16_SLACK = 3.0


def sharp(model: torch.nn.Module, gain: float = 8.0) -> torch.nn.Module:
    """Queries and keys scaled up so that attention is peaked and positions move the output (a random tiny model
    attends almost uniformly, where RoPE hardly matters)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(gain)
            layer.self_attn.k_proj.weight.mul_(gain)
    return model


@pytest.mark.parametrize("method", ["pmod", "gamma_mod"])
def test_bf16_compaction_is_within_bf16_error_of_the_fp32_reference(method: str) -> None:
    """Positions past 256 (bf16 has 8 significant bits: 257 is not a bf16 number; positions rounded through bf16
    fail here, not in a finite-only check) and rows of unequal length."""
    config = {
        "pmod": PModConfig(schedule="explicit", ratios=[None, 0.5, 0.3, 0.15]),
        "gamma_mod": GammaMoDConfig(layers=[1, 2, 3]),
    }[method]
    dense32 = sharp(tiny_llama(num_layers=4))
    model32 = pmod.convert(copy.deepcopy(dense32), config)
    randomize_routers(model32)
    model16, dense16 = copy.deepcopy(model32).to(torch.bfloat16), copy.deepcopy(dense32).to(torch.bfloat16)
    ids, am, vm = routed_batch([(20, 380, False), (30, 200, True)], "left", seed=3)
    real = am.bool()
    with torch.no_grad(), pmod.record_routing(model16) as rec:
        got = model16(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    chosen = {layer: masks[0] for layer, masks in rec.processed.items()}  # near-ties may flip in bf16
    with torch.no_grad():
        want32 = reference_logits(dense32, reference_rules(model32), ids, am, vm, processed=chosen)
        want16 = reference_logits(dense16, reference_rules(model16), ids, am, vm, processed=chosen)
    assert got.dtype == torch.bfloat16
    err = (got.float() - want32)[real].abs().max().item()
    own = (want16.float() - want32)[real].abs().max().item()
    assert 0 < own < 0.1 * want32[real].abs().max().item()  # bf16 really rounds, and not wildly
    assert err <= BF16_SLACK * own, (err, own)
    # The decisions bf16 made are the fp32 rule's on nearly every token (bf16 scores may swap near-ties only).
    with torch.no_grad(), pmod.record_routing(model32) as rec32:
        model32(input_ids=ids, attention_mask=am, vision_mask=vm)
    for layer, masks in rec32.processed.items():
        differ = (masks[0] != chosen[layer])[real].float().mean().item()
        assert differ < 0.05, (layer, differ)


def test_renumbered_positions_equal_the_original_codes() -> None:
    """``renumber_positions``: the processed tokens of a row are at 0..K-1 in every MoD layer (the reference
    recomputes RoPE per layer from the processed mask), not at their own positions."""
    dense = sharp(tiny_llama(num_layers=4, attn_implementation="eager"))
    config = GammaMoDConfig(layers=[1, 2, 3], renumber_positions=True)
    model = pmod.convert(copy.deepcopy(dense), config)
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(12, 20, False), (10, 8, True), (9, 0, False)], "right", seed=4)
    real = am.bool()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False).logits
        rules = reference_rules(model)
        want = reference_logits(dense, rules, ids, am, vm)
        for rule in rules.values():
            rule.renumber_positions = False
        own_positions = reference_logits(dense, rules, ids, am, vm)
    assert all(rule.ratio == 0.5 for rule in rules.values())
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert (got[real] - own_positions[real]).abs().max() > 1e-2  # the positions matter here


def test_threshold_prefill_equals_the_reference() -> None:
    """``prefill_rule="threshold"`` (the original evaluation code's) keeps every routable token with p above the
    threshold; here a declared 0.4 instead of the original 0.005, so that some are skipped."""
    dense = tiny_llama(num_layers=4, attn_implementation="eager")
    model = pmod.convert(copy.deepcopy(dense), GammaMoDConfig(layers=[1, 3], prefill_rule="threshold",
                                                              prefill_threshold=0.4))  # fmt: skip
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(12, 20, False), (10, 8, True)], "left", seed=6)
    real = am.bool()
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_logits(dense, reference_rules(model, prefill_threshold=0.4), ids, am, vm)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    share = [float(rec.processed[i][0][vm].float().mean()) for i in (1, 3)]
    assert all(0.1 < s < 0.9 for s in share), share  # neither all nor none of the vision tokens run
