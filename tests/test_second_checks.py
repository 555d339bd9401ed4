"""A second, independent check for each fact that one test alone guarded: KV bytes under grouped-query attention
(the analytic accounting against a real cache), decode FLOPs (against FlopCounterMode on a real decode step),
top-k tie-breaking (the selection against a plain sort, and through another method) and floor-vs-round (the
accounting against the counts a forward really processed)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import pmod
from pmod import FastVConfig, GammaMoDConfig, PModConfig
from pmod.analysis.analytic_flops import counted_flops, estimate, flop_counter
from pmod.core.cache import cache_kwargs
from pmod.core.compaction import top_k_mask
from pmod.testing import randomize_routers, routed_batch, tiny_llama

# 8 text tokens around 23 vision tokens, two equal rows without padding (the accounting's assumption).
N_TEXT, N_VISION = 8, 23
# floor differs from round on each routed layer: 23 * 0.5 = 11.5, 23 * 0.3 = 6.9, 23 * 0.8 = 18.4 -> 11, 6, 18.
RATIOS = [None, 0.5, 0.3, 0.8]
KEPT_BY_HAND = [N_VISION, 11, 6, 18]


def routed_model(config: pmod.MethodConfig, attn: str = "eager") -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=4, attn_implementation=attn)
    model = pmod.convert(copy.deepcopy(dense), config)
    randomize_routers(model, scale=3.0)
    return dense, model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, am, vm = routed_batch([(N_TEXT, N_VISION, False)], "right", seed=7)
    return ids.repeat(2, 1), am.repeat(2, 1), vm.repeat(2, 1)


def prefill(model: torch.nn.Module) -> tuple[DynamicCache, torch.Tensor]:
    ids, am, vm = batch()
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(cache), use_cache=True)
    return cache, am


def test_gqa_kv_bytes_of_a_real_cache_equal_the_accounting() -> None:
    cfg = PModConfig(schedule="explicit", ratios=RATIOS)
    dense, model = routed_model(cfg)
    text = model.config
    heads, kv_heads, head_dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    assert heads != kv_heads != 1  # grouped-query attention: a count with either heads number would differ
    cache, _ = prefill(model)
    dense_cache, _ = prefill(dense)
    for layer, kept in enumerate(KEPT_BY_HAND):  # [B, KV heads, processed tokens, head dim] in every layer
        assert tuple(cache.layers[layer].keys.shape) == (2, kv_heads, N_TEXT + kept, head_dim)
    by_hand = sum(2 * 2 * (N_TEXT + kept) * kv_heads * head_dim * 4 for kept in KEPT_BY_HAND)  # K and V, fp32
    report = estimate(text, cfg, n_vision=N_VISION, n_text=N_TEXT, batch_size=2, dtype=torch.float32)
    assert pmod.kv_cache_bytes(cache).total_bytes == report.routed_kv_bytes == by_hand
    assert pmod.kv_cache_bytes(dense_cache).total_bytes == report.dense_kv_bytes
    assert report.dense_kv_bytes == 4 * 2 * 2 * (N_TEXT + N_VISION) * kv_heads * head_dim * 4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decode_step_flops_equal_the_accounting(attn: str) -> None:
    """One decoded token per row attends to each layer's cached tokens plus itself (k + 1 keys)."""
    cfg = PModConfig(schedule="explicit", ratios=RATIOS)
    dense, model = routed_model(cfg, attn)
    report = estimate(model.config, cfg, n_vision=N_VISION, n_text=N_TEXT, batch_size=2)
    for net, want in ((model, report.routed_decode_flops), (dense, report.dense_decode_flops)):
        cache, am = prefill(net)
        token = torch.full((2, 1), 5)
        counter = flop_counter()
        with torch.no_grad(), counter:
            net(input_ids=token, attention_mask=torch.cat([am, torch.ones_like(token)], 1), **cache_kwargs(cache),
                use_cache=True)  # fmt: skip
        # The accounting counts the router on the decoded token in every routed layer (2 * hidden per row; an
        # upper bound, as for gamma-MoD); p-MoD's rule does not run it on a chunk without vision tokens.
        unrun_router = 0 if net is dense else 3 * 2 * 2 * model.config.hidden_size
        assert counted_flops(counter) == want - unrun_router
    # The attention part by hand: 2 (QK^T, AV) * 2 * heads * head_dim * (k + 1) per row and layer.
    text = model.config
    attention = sum(2 * 2 * 2 * text.num_attention_heads * text.head_dim * (N_TEXT + k + 1) for k in KEPT_BY_HAND)
    dense_attention = 4 * 2 * 2 * 2 * text.num_attention_heads * text.head_dim * (N_TEXT + N_VISION + 1)
    routers = 3 * 2 * 2 * text.hidden_size
    assert report.dense_decode_flops - report.routed_decode_flops == dense_attention - attention - routers


@pytest.mark.parametrize("seed", range(4))
def test_top_k_ties_go_to_the_lower_position(seed: int) -> None:
    """The selection against a plain sort by (-score, position), on scores with many ties."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (5, 17), generator=g).float()
    candidates = torch.rand(5, 17, generator=g) < 0.7
    k = torch.tensor([int(torch.randint(0, int(c.sum()) + 1, (1,), generator=g)) for c in candidates])
    got = top_k_mask(scores, candidates, k)
    for row in range(5):
        pool = [p for p in range(17) if candidates[row, p]]
        want = sorted(pool, key=lambda p: (-float(scores[row, p]), p))[: int(k[row])]
        assert got[row].nonzero().flatten().tolist() == sorted(want), row


def test_gamma_mod_zero_router_keeps_the_first_routable_tokens() -> None:
    """A zero shared router gives every token p = 0.5: the lowest routable positions win every tie."""
    model = pmod.convert(tiny_llama(num_layers=3), GammaMoDConfig(layers=[1, 2], skip_ratio=0.5))
    with torch.no_grad():
        for weight in model.model.gamma_mod_router.parameters():
            weight.zero_()
    ids, am, vm = routed_batch([(6, 9, True)], "right", seed=2)
    question = am.bool() & ~vm & (torch.arange(ids.shape[1]) < 4)  # text among the first 4 positions
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm, question_mask=question)
    routable = [p for p in range(ids.shape[1]) if not question[0, p]]
    kept = routable[: len(routable) // 2]
    for layer in (1, 2):
        assert rec.processed[layer][0][0].nonzero().flatten().tolist() == sorted(kept + question[0].nonzero()
                                                                                  .flatten().tolist())  # fmt: skip


@pytest.mark.parametrize(
    "config, kept_by_hand",
    [
        (PModConfig(schedule="explicit", ratios=RATIOS), KEPT_BY_HAND),  # floor: 11, 6, 18
        (FastVConfig(layer=2, keep=0.5), [N_VISION, N_VISION, 12, 12]),  # round(11.5) = 12 (halves to even)
    ],
)
def test_processed_counts_equal_the_accounting(config: pmod.MethodConfig, kept_by_hand: list[int]) -> None:
    _, model = routed_model(config)
    ids, am, vm = batch()
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    report = estimate(model.config, config, n_vision=N_VISION, n_text=N_TEXT)
    for layer, kept in enumerate(kept_by_hand):
        ran = rec.processed[layer][0].sum(1).tolist() if layer in rec.processed else [N_TEXT + N_VISION] * 2
        assert ran == [N_TEXT + kept] * 2, layer
        assert report.routed_layers[layer].processed == N_TEXT + kept, layer
