"""The constants the papers fix, written here literally next to where the paper fixes them, against every method
config's defaults and against the testing reference's own table (which never reads them from pmod's configs).

Sources: /work/shared/papers (p-MoD supplementary, gamma-MoD) and the FastV title.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import DynamicCache

import pmod
from pmod import FastVConfig, GammaMoDConfig, MoDConfig, PModConfig
from pmod.core.cache import cache_kwargs
from pmod.testing import randomize_routers, routed_batch, tiny_llama
from pmod.testing import reference as ref

# p-MoD supplementary D.2: "By default, we set the gating factor alpha in TanhNorm to 0.2"; C.2 writes TanhNorm as
# X' = alpha tanh(w) T(X) + X, so the token enters with weight 1: w~ = 0.2 tanh(w) + 1.0.
TANH_SCALE, TANH_BIAS = 0.2, 1.0
# p-MoD D.2: "the shift factor beta in PRD to 0.5": R_l = 0.5 cos(pi l / (L-1)) + 0.5. D.3, Eq. (6): R_l >= max is
# dense, R_l <= min is clamped to min; max 0.85 and min 0.15 as in the released checkpoints'
# "shiftedcos_decay_0.85_0.15".
PRD_BETA, PRD_MAX, PRD_MIN = 0.5, 0.85, 0.15
# gamma-MoD 5.2: "the fourth largest ARank value is used as the threshold for converting dense layers to MoD ones";
# "the coefficient for the routing loss is set to 0.01".
ARANK_RANK, ROUTING_LOSS_WEIGHT = 4, 0.01
# gamma-MoD Eq. (2): x_j is processed when R(x_j) >= delta_s; R is the binary softmax of Eq. (7), so a token runs
# when the router prefers running it: p >= 0.5.
DECODE_THRESHOLD = 0.5
# gamma-MoD Table 3: gamma-MoD-0.5, "routing ratio of 50%" (the LLaVA-HR default of Tables 2 and 4).
SKIP_RATIO = 0.5
# FastV: "An Image is Worth 1/2 Tokens After Layer 2": K = 2, keep 50% of the vision tokens.
FASTV_K, FASTV_KEEP = 2, 0.5


def prd_by_hand(num_layers: int) -> list[float | None]:
    ratios: list[float | None] = []
    for layer in range(num_layers):
        r = 0.5 * math.cos(math.pi * layer / (num_layers - 1)) + 0.5
        ratios.append(None if layer == 0 or r >= 0.85 else max(r, 0.15))
    return ratios


def test_pmod_defaults_are_the_papers() -> None:
    cfg = PModConfig()
    assert (cfg.schedule, cfg.weight_norm, cfg.string) == ("prd", "tanh", True)  # PRD, TanhNorm, STRing on
    assert (cfg.scale, cfg.bias) == (TANH_SCALE, TANH_BIAS)
    assert (cfg.beta, cfg.max_ratio, cfg.min_ratio) == (PRD_BETA, PRD_MAX, PRD_MIN)
    for layers in (32, 40, 6):
        assert cfg.layer_ratios(layers) == prd_by_hand(layers), layers
    # 32 layers: layers 0-7 dense, R_8 = 0.5 cos(8 pi / 31) + 0.5 = 0.844483 the first p-MoD layer, 0.15 from 24 on.
    ratios = cfg.layer_ratios(32)
    assert ratios[:8] == [None] * 8 and ratios[8] == pytest.approx(0.844483, abs=1e-6) and ratios[24:] == [0.15] * 8


def test_other_methods_defaults_are_the_papers() -> None:
    gamma = GammaMoDConfig()
    assert (gamma.threshold_rank, gamma.routing_loss_weight) == (ARANK_RANK, ROUTING_LOSS_WEIGHT)
    assert (gamma.decode_threshold, gamma.skip_ratio, gamma.layers) == (DECODE_THRESHOLD, SKIP_RATIO, "arank")
    # The original code's prefill: top-k as in training, positions kept (not renumbered).
    assert (gamma.prefill_rule, gamma.prefill_threshold, gamma.renumber_positions) == ("top_k", 0.005, False)
    fastv = FastVConfig()
    assert (fastv.layer, fastv.keep) == (FASTV_K, FASTV_KEEP)
    # Vanilla MoD as p-MoD's baseline: half the vision tokens on layers 2..L-2 (the original MoD code's deep_all).
    mod = MoDConfig()
    assert (mod.ratio, mod.layers) == (0.5, "deep_all")
    assert mod.layer_ratios(8) == [None, None, 0.5, 0.5, 0.5, 0.5, 0.5, None]


def test_the_references_table_holds_the_same_values() -> None:
    # Written twice on purpose (here and in pmod.testing.reference): a change to one alone fails here.
    assert ref.WEIGHT_NORMS["tanh"] == (TANH_SCALE, TANH_BIAS)
    assert ref.PAPER["pmod"] == {"beta": PRD_BETA, "max_ratio": PRD_MAX, "min_ratio": PRD_MIN}
    gamma = ref.PAPER["gamma_mod"]
    assert (gamma["threshold_rank"], gamma["routing_loss_weight"]) == (ARANK_RANK, ROUTING_LOSS_WEIGHT)
    assert gamma["decode_threshold"] == DECODE_THRESHOLD
    assert ref.PAPER["fastv"] == {"layer": FASTV_K, "keep": FASTV_KEEP}
    # The reference computes the schedules itself: PRD for 32 layers is the hand formula, not pmod.core.schedules.
    assert ref.reference_ratios(PModConfig(), 32) == prd_by_hand(32)
    # ARank: the 4th largest of these is 6, so layers 0, 2, 4 and 6 stay dense.
    by_arank = ref.reference_ratios(GammaMoDConfig(layers="arank", arank=[9, 1, 8, 2, 7, 3, 6, 4]), 8)
    assert by_arank == [None, 0.5] * 4
    assert ref.reference_ratios(FastVConfig(), 5) == [None, None, 0.5, 0.5, 0.5]


def converted(config: pmod.MethodConfig, num_layers: int = 4) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=num_layers, attn_implementation="eager")
    model = pmod.convert(copy.deepcopy(dense), config)
    randomize_routers(model, scale=3.0)
    return dense, model


@pytest.mark.parametrize(
    "config, field, value",
    [
        (GammaMoDConfig(layers=[1, 2], decode_threshold=0.7), "decode_threshold", 0.7),
        (GammaMoDConfig(layers=[1, 2], routing_loss_weight=0.1), "routing_loss_weight", 0.1),
        (FastVConfig(layer=1), "layer", 1),
        (PModConfig(beta=0.45), "beta", 0.45),
    ],
)
def test_reference_refuses_a_value_other_than_the_papers(config, field, value) -> None:
    """A model whose config disagrees with the paper is refused by name; a test that means it declares it."""
    _, model = converted(config)
    with pytest.raises(ValueError, match=f"{field} is {value!r} but the reference uses"):
        ref.reference_rules(model)
    assert ref.reference_rules(model, **{field: value})


def test_declared_decode_threshold_is_what_the_model_decodes_with() -> None:
    """With the declared threshold the reference decodes like the model; with the paper's 0.5 it would not (some
    decoded token's p lies between the two)."""
    dense, model = converted(GammaMoDConfig(layers=[1, 2, 3], decode_threshold=0.6))
    ids, am, vm = routed_batch([(6, 10, False), (5, 7, True)], "left", seed=1)
    new = torch.randint(4, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    full, full_am = torch.cat([ids, new], 1), torch.cat([am, torch.ones_like(new)], 1)
    full_vm = torch.cat([vm, torch.zeros_like(new, dtype=torch.bool)], 1)
    cache, got = DynamicCache(), []
    with torch.no_grad():
        step = model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(cache), use_cache=True)
        for t in range(new.shape[1]):
            got.append(step.logits[:, -1])
            step = model(input_ids=new[:, t : t + 1], attention_mask=full_am[:, : ids.shape[1] + t + 1],
                         **cache_kwargs(cache), use_cache=True)  # fmt: skip
        got = torch.stack(got, 1)
        rules = ref.reference_rules(model, decode_threshold=0.6)
        at_half = {i: ref.GammaMoDReference(rule.router, rule.ratio, 0.5) for i, rule in rules.items()}
        prompt = ids.shape[1]
        want = ref.reference_logits(dense, rules, full, full_am, full_vm, prompt_length=prompt)[:, prompt - 1 : -1]
        other = ref.reference_logits(dense, at_half, full, full_am, full_vm, prompt_length=prompt)[:, prompt - 1 : -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - other).abs().max() > 1e-2
