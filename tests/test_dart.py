"""DART against its independent reference (``pmod.testing.reference_pruning``): pivots by the L1 norm of layer
K-1's keys, the vision tokens least cosine-similar to them kept from layer K on, at other budgets too; the cache
and the analytic cost of the scoring. The compacted execution at these settings (the kept tokens too), decoding,
batching, save/load and the FLOPs against FlopCounterMode, on every backbone, are tests/test_matrix.py's."""

from __future__ import annotations

import copy

import pytest
import torch

import pmod
from pmod import DARTConfig
from pmod.analysis.analytic_flops import estimate
from pmod.core.cache import cache_of
from pmod.testing import (
    routed_batch,
    tiny_llama,
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


def test_analytic_cost_of_the_scoring() -> None:
    """Layer K-1's extra key projection over every token, layer K's similarities to the pivots (the matrix checks
    the totals against FlopCounterMode)."""
    _, model = models()
    n_text, n_vision = 16, 32
    report = estimate(model.config, CONFIG, n_vision=n_vision, n_text=n_text)
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
    from test_cli_methods import generate_on_the_fly

    err, share = generate_on_the_fly(tmp_path, capsys, 6, DARTConfig(layer=3, keep=0.3, pivots=2),
                                     ["--method", "dart", "--dart-layer", "3", "--dart-keep", "0.3",
                                      "--dart-pivots", "2"])  # fmt: skip
    assert f", {share})" in err and share != "100.0%"
