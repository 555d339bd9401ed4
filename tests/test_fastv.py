"""FastV specifics: the ranking row is the last token's softmax attention in layer K-1, per row, under any backend;
the pruned tokens leave no K/V in layers >= K."""

from __future__ import annotations

import copy

import pytest
import torch

import pmod
from pmod import FastVConfig
from pmod.core.cache import cache_of
from pmod.testing import routed_batch, tiny_llama

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ranking_row_is_eager_softmax_attention_of_layer_k_minus_1(padding_side: str, attn: str) -> None:
    dense = tiny_llama(num_layers=6, attn_implementation="eager")
    model = pmod.convert(copy.deepcopy(dense), FastVConfig(layer=3, keep=0.5))
    model.set_attn_implementation(attn)
    ids, am, vm = routed_batch(ROWS, padding_side)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
        attentions = dense(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    real = am.bool()
    last = [int(real[b].nonzero().max()) for b in range(len(ROWS))]
    want = torch.stack([attentions[2][b, :, last[b], :].mean(0) for b in range(len(ROWS))])
    assert sorted(rec.weights) == [3, 4, 5]
    for layer in (3, 4, 5):
        torch.testing.assert_close(rec.weights[layer][0][real], want[real], atol=1e-6, rtol=1e-5)
    # Per row: the top round(n_vision / 2) vision tokens by that row's own attention, the same in every layer >= K.
    for b, (_, n_vision, _) in enumerate(ROWS):
        vision = (vm & real)[b].nonzero().flatten().tolist()
        top = sorted(vision, key=lambda p: (-want[b, p].item(), p))[: round(n_vision * 0.5)]
        for layer in (3, 4, 5):
            kept = (rec.processed[layer][0][b] & vm[b]).nonzero().flatten().tolist()
            assert kept == sorted(top)


def test_cache_of_pruned_layers_holds_only_kept_tokens() -> None:
    model = pmod.convert(tiny_llama(num_layers=6), FastVConfig(layer=2, keep=0.25))
    ids, am, vm = routed_batch(ROWS, "right")
    with torch.no_grad():
        cache = cache_of(model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=True))
    size = pmod.kv_cache_bytes(cache)
    n_text = [t for t, _, _ in ROWS]
    for layer in range(6):
        if layer < 2:
            assert size.layer_slots[layer] == ids.shape[1]
        else:
            assert size.layer_tokens[layer] == [t + round(v * 0.25) for t, (_, v, _) in zip(n_text, ROWS)]


def test_fastv_is_training_free_and_validates() -> None:
    from pmod.recipes.train import TrainError, parse_args

    with pytest.raises(TrainError, match="training-free"):
        parse_args(["--model", "m", "--method", "fastv"])
    with pytest.raises(ValueError, match=">= 1"):
        FastVConfig(layer=0)
    with pytest.raises(ValueError, match="beyond"):
        pmod.convert(tiny_llama(num_layers=3), FastVConfig(layer=3))
    assert FastVConfig(layer=2, keep=0.5).layer_ratios(4) == [None, None, 0.5, 0.5]


def _kept_vision(model, rows, padding_side: str) -> list[list[int]]:
    """Per row, the indices (among the row's vision tokens) of those kept in layer 2, and check every layer >= 2
    keeps the same ones and all text."""
    ids, am, vm = routed_batch(rows, padding_side)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    real, kept = am.bool(), []
    for b, (n_text, _, _) in enumerate(rows):
        vision = (vm & real)[b].nonzero().flatten().tolist()
        for layer in range(2, 6):
            processed = rec.processed[layer][0][b]
            assert int((processed & real[b] & ~vm[b]).sum()) == n_text
            assert processed[vision].tolist() == rec.processed[2][0][b][vision].tolist()
        kept.append([i for i, p in enumerate(vision) if rec.processed[2][0][b, p]])
    return kept


def test_random_ranking_keeps_a_seeded_draw_whatever_the_batch() -> None:
    """ranking="random" (the task check's control): the i-th vision token of a row scores the i-th number of
    torch.rand drawn on the CPU with ``seed``; the row keeps the round(n keep) best, the same in every layer >= K,
    alone or in a batch, left- or right-padded, in the first forward or a later one. Another seed, another set."""
    model = pmod.convert(tiny_llama(num_layers=6), FastVConfig(layer=2, keep=0.5, ranking="random", seed=3))
    draw = torch.rand(1024, generator=torch.Generator().manual_seed(3))
    want = [sorted(sorted(range(n), key=lambda i: -draw[i].item())[: round(n * 0.5)]) for _, n, _ in ROWS]
    assert _kept_vision(model, ROWS, "left") == want
    assert _kept_vision(model, ROWS, "right") == want  # a second forward, other padding
    assert _kept_vision(model, ROWS[1:2], "right") == want[1:2]  # a row alone
    other = pmod.convert(tiny_llama(num_layers=6), FastVConfig(layer=2, keep=0.5, ranking="random", seed=4))
    assert _kept_vision(other, ROWS, "left") != want


def test_unknown_ranking_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="FastV ranking 'top' is unknown; choose one of attention, random"):
        FastVConfig(ranking="top")
