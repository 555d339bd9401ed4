"""Tests written to kill the mutants that survived the rest of the suite in the training-free methods' run-time
rules (``pmod.methods.fastv_rules``, ``pdrop_rules``, ``dart_rules``), their configs and the budget knob
(``pmod.analysis.budget``; see ``benchmarks/mutation/run_mutation.py``). Expected values are worked out by hand in
the comments, never read back from the code under test."""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import pytest
import torch

import pmod
from pmod.analysis.analytic_flops import estimate, layer_cost
from pmod.analysis.budget import at_budget, cost_ratio
from pmod.analysis.dims import LMDims
from pmod.core.routed_layer import RoutingInputs
from pmod.methods import DARTConfig, FastVConfig, PDropConfig, PModConfig
from pmod.methods.dart import PivotLayerPlan
from pmod.methods.dart_rules import duplication_ranking, pivot_tokens
from pmod.methods.fastv_rules import SCORES, FastVScoreRule, last_token_attention
from pmod.testing import routed_batch, tiny_llama

# hidden 128, 12 layers, 4 heads (and 4 KV heads) of 32, MLP 256, vocab 64; 64 vision + 16 text tokens
DIMS = LMDims(hidden=128, layers=12, heads=4, kv_heads=4, head_dim=32, intermediate=256, vocab=64)
WORKLOAD = {"n_vision": 64, "n_text": 16}


def _layer_flops(k: int) -> int:
    """Prefill FLOPs of one layer of DIMS on k tokens, by hand: q, k, v, o projections (4 * 128 wide each way),
    QK^T and AV (2 * 4 heads * k * k * 32 each), the SwiGLU MLP (3 matmuls 128 x 256)."""
    return k * 2 * 128 * 512 + 2 * (2 * 4 * k * k * 32) + k * 3 * 2 * 128 * 256


# FastV K=2, keep 0.5: layers 0 and 1 see all 80 tokens, layer 1 also scores the last token's attention row (k_proj
# over 80 tokens, q_proj of one, one QK^T row of 80), layers 2..11 see 16 text + round(64 * 0.5) = 32 vision tokens;
# the LM head runs on all 80 tokens (2 * 80 * 128 * 64).
SCORING = 2 * 80 * 128 * 128 + 2 * 128 * 128 + 2 * 4 * 80 * 32
LM_HEAD = 2 * 80 * 128 * 64
FASTV_TFLOPS = (2 * _layer_flops(80) + SCORING + 10 * _layer_flops(48) + LM_HEAD) / (12 * _layer_flops(80) + LM_HEAD)
FASTV_KV = (2 * 80 + 10 * 48) / (12 * 80)  # KV entries per layer = tokens the layer processes


def test_cost_ratio_measures_prefill_tflops_by_default_and_kv_bytes_on_request() -> None:
    assert cost_ratio(FastVConfig(), DIMS, **WORKLOAD) == pytest.approx(FASTV_TFLOPS, rel=1e-12)
    assert cost_ratio(FastVConfig(), DIMS, "tflops", **WORKLOAD) == pytest.approx(FASTV_TFLOPS, rel=1e-12)
    assert cost_ratio(FastVConfig(), DIMS, "kv", **WORKLOAD) == pytest.approx(2 / 3, rel=1e-12)
    assert FASTV_KV == 2 / 3 and abs(FASTV_TFLOPS - FASTV_KV) > 0.01  # the two measures tell the mutants apart


# FastV's knob is keep in [1e-6, 1]. Cheapest: round(64e-6) = 0 vision tokens from layer 2; dearest: keep 1, all
# 80 tokens everywhere plus layer 1's scoring row (so a little above dense's cost).
FASTV_MIN = (2 * _layer_flops(80) + SCORING + 10 * _layer_flops(16) + LM_HEAD) / (12 * _layer_flops(80) + LM_HEAD)
FASTV_MAX = (12 * _layer_flops(80) + SCORING + LM_HEAD) / (12 * _layer_flops(80) + LM_HEAD)


def test_budgets_at_the_ends_of_the_reachable_range_and_within_its_tolerance() -> None:
    """The reachable range includes its ends, and budgets up to 1e-12 outside them (a printed and re-read cost);
    a budget 1e-9 outside is refused. The dearest budget gives keep 1.0 itself (the knob's upper bound)."""
    assert cost_ratio(FastVConfig(keep=1e-6), DIMS, **WORKLOAD) == pytest.approx(FASTV_MIN, rel=1e-12)
    assert cost_ratio(FastVConfig(keep=1.0), DIMS, **WORKLOAD) == pytest.approx(FASTV_MAX, rel=1e-12)
    low, high = (cost_ratio(FastVConfig(keep=k), DIMS, **WORKLOAD) for k in (1e-6, 1.0))
    assert at_budget(FastVConfig(), DIMS, high, **WORKLOAD).keep == 1.0
    assert at_budget(FastVConfig(), DIMS, high + 1e-12, **WORKLOAD).keep == 1.0
    for budget in (low, low - 1e-12):
        chosen = at_budget(FastVConfig(), DIMS, budget, **WORKLOAD)
        assert round(64 * chosen.keep) == 0 and 1e-6 <= chosen.keep <= 1.0
    for budget in (high + 1e-9, low - 1e-9):
        with pytest.raises(ValueError, match="fastv reaches tflops shares"):
            at_budget(FastVConfig(), DIMS, budget, **WORKLOAD)


def _random_scores(seed: int, vision: torch.Tensor, rule: FastVScoreRule | None = None) -> torch.Tensor:
    """FastV's random control through its rule's ``route``, as layer K-1 runs it: scores [B, T]."""
    rule = rule or FastVScoreRule(random_seed=seed)
    inputs = RoutingInputs(vision_mask=vision)
    assert rule.route(None, torch.zeros(*vision.shape, 1), inputs) is None
    return inputs.shared[SCORES][..., 0]


def test_random_control_draws_again_for_a_sequence_longer_than_its_draw() -> None:
    """The i-th vision token of a row scores the i-th number of torch.rand drawn with the seed on the CPU (a draw's
    first numbers do not depend on its length), however long the sequence: a 1,500-token row after a short one."""
    rule = FastVScoreRule(random_seed=7)
    draw = torch.rand(1500, generator=torch.Generator().manual_seed(7))
    short = torch.tensor([[False, True, True, False, True]])
    assert _random_scores(7, short, rule).tolist() == [[draw[0], draw[0], draw[1], draw[1], draw[2]]]
    long = torch.zeros(1, 1500, dtype=torch.bool)
    long[0, 10:] = True  # 1,490 vision tokens after 10 text tokens
    scores = _random_scores(7, long, rule)
    assert torch.equal(scores[0, 10:], draw[:1490]) and torch.equal(scores[0, :10], draw[0].expand(10))


def test_a_budget_at_a_cost_step_gives_the_top_of_the_step_in_two_digits() -> None:
    """FastV's cost moves in steps of one kept vision token: keep in [39.5/64, 40.5/64] = [0.6171875, 0.6328125]
    keeps round(64 keep) = 40. For a budget equal to that step's cost, bisection keeps cost(cheap) <= budget, so it
    ends on the step's top edge 0.6328125, returned with the fewest significant digits (from 2) that keep the cost:
    0.63 (64 * 0.63 = 40.32 -> 40). At keep 0.5 (the step [31.5/64, 32.5/64] = [0.4921875, 0.5078125]) the top edge
    gives 0.51 (32.64 -> 33, no), 0.508 (32.512 -> 33, no), 0.5078 (32.4992 -> 32)."""
    for kept, want in ((40, 0.63), (32, 0.5078)):
        budget = cost_ratio(FastVConfig(keep=kept / 64), DIMS, **WORKLOAD)
        assert at_budget(FastVConfig(), DIMS, budget, **WORKLOAD).keep == want


def test_a_knob_that_does_not_move_the_cost_stays_at_its_dearest_end() -> None:
    """Without vision tokens FastV's keep changes nothing: every setting costs the same, and the one chosen is the
    knob's dearest end, keep 1.0 (prune nothing when pruning gains nothing)."""
    text_only = {"n_vision": 0, "n_text": 16}
    budget = cost_ratio(FastVConfig(), DIMS, **text_only)
    assert budget == cost_ratio(FastVConfig(keep=1e-6), DIMS, **text_only)
    assert at_budget(FastVConfig(), DIMS, budget, **text_only).keep == 1.0


def test_last_token_attention_keys_only_narrow_what_it_attends_to() -> None:
    """``keys`` limits the tokens attended to; it never adds padding or tokens after the last real one: keys that
    are all True give the row of keys=None. Row 0 is right-padded (2 pads), row 1 has no padding."""
    model = tiny_llama(num_layers=2)
    layer = model.model.layers[0]
    hidden = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    real = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    position_embeddings = model.model.rotary_emb(hidden, torch.arange(6)[None])
    with torch.no_grad():
        plain = last_token_attention(layer, hidden, real, position_embeddings)
        everything = last_token_attention(layer, hidden, real, position_embeddings, keys=torch.ones(2, 6).bool())
    assert torch.equal(plain, everything)
    assert plain[0, 4:].tolist() == [0.0, 0.0] and torch.allclose(plain.sum(1), torch.ones(2))


@pytest.fixture(scope="module")
def count_ops():
    """``benchmarks/count_ops.py``, the op and host-sync counter (as tests/test_count_ops.py imports it)."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        yield importlib.import_module("count_ops")
    finally:
        sys.path.remove(benchmarks)


@pytest.mark.parametrize(
    "config",
    [FastVConfig(layer=2, keep=0.5), PDropConfig(layers=[2, 3, 4], keep=0.5), DARTConfig(layer=2, keep=0.5)],
    ids=lambda c: c.method,
)
def test_given_the_counts_a_prefill_reads_nothing_back_to_the_host(config, count_ops) -> None:
    """With the per-row vision and real counts passed in (as a compiled prefill needs), the training-free methods'
    prefill makes no host read of its own: exactly the dense model's syncs (transformers' own). Each rule names its
    candidates as the plan's VISION kind, whose counts the caller gave; under another kind the plan counts the
    mask on the host, one more sync."""
    dense = tiny_llama(num_layers=6)
    model = pmod.convert(copy.deepcopy(dense), copy.deepcopy(config)).eval()
    ids, am, vm = routed_batch([(5, 8, False), (3, 4, False)], "left")
    counts = {"vision_counts": vm.sum(1).tolist(), "real_counts": am.sum(1).tolist()}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False, **counts)  # first-call setup
        with count_ops.counting(model) as routed:
            model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False, **counts)
        with count_ops.counting(dense) as plain:
            dense(input_ids=ids, attention_mask=am, use_cache=False)
    assert plain.to_dict()["syncs"] == 2 and routed.to_dict()["syncs"] == 2


def test_pivots_in_position_order_missing_ones_last_and_text_pivots_of_a_row_without_vision() -> None:
    """Row 0: vision tokens at 1 and 2, three vision pivots asked (the third is missing), two text pivots among the
    text after the last vision token (positions 3..7; position 0 is before it). Row 1: no vision token, so every real
    token is text after it (position 7 is padding, with the largest norm)."""
    norms = torch.tensor([[9.0, 5, 7, 1, 8, 2, 6, 3], [8, 7, 1, 2, 3, 4, 5, 9]])
    vision = torch.zeros(2, 8, dtype=torch.bool)
    vision[0, 1:3] = True
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, 7] = False
    image, image_ok, pivots, ok = pivot_tokens(norms, vision, real, 3, 2)
    assert image[0, :2].tolist() == [2, 1] and image_ok.tolist() == [[True, True, False], [False] * 3]
    # row 0: vision 2 (norm 7), 1 (5); text 4 (8), 6 (6) -> position order 1, 2, 4, 6, then the missing one
    # row 1: text 0 (8), 1 (7) -> 0, 1, then the three missing vision pivots
    assert pivots[0, :4].tolist() == [1, 2, 4, 6] and pivots[1, :2].tolist() == [0, 1]
    assert ok.tolist() == [[True] * 4 + [False], [True] * 2 + [False] * 3]


def test_pivots_of_equal_norms_are_the_lowest_positions() -> None:
    """Ties go to the lower position: 48 vision tokens (0..47) and 16 text tokens of one norm give the vision
    pivots 0..7 and the text pivots 48..51."""
    vision = torch.zeros(1, 64, dtype=torch.bool)
    vision[0, :48] = True
    image, _, pivots, ok = pivot_tokens(torch.ones(1, 64), vision, torch.ones(1, 64).bool(), 8, 4)
    assert image.tolist() == [list(range(8))] and pivots.tolist() == [[*range(8), 48, 49, 50, 51]] and ok.all()


def test_one_pivot_fills_the_whole_budget_taking_equally_dissimilar_tokens_by_position() -> None:
    """32 vision tokens (0..31) and 8 text tokens; one vision pivot (position 5, the largest key norm), no text
    pivot; keep 0.5: round(32 * 0.5) = 16 kept, the pivot and ceil((16 - 1) / 1) = 15 more. Every other token is
    orthogonal to the pivot (similarity 0, a tie), so they are taken by position: 0..4 and 6..15, in that order."""
    states = torch.tensor([[0.0, 1.0]]).repeat(40, 1)
    states[5] = torch.tensor([1.0, 0.0])
    norms = torch.ones(1, 40)
    norms[0, 5] = 10.0
    vision = torch.zeros(1, 40, dtype=torch.bool)
    vision[0, :32] = True
    ranking = duplication_ranking(states[None], norms, vision, torch.ones(1, 40).bool(), 0.5, (1, 0))
    want = [-(p + 1.0) for p in range(5)] + [0.0] + [-float(p) for p in range(6, 16)] + [float("-inf")] * 24
    assert ranking.tolist() == [want]


def test_duplication_ranking_of_a_batch_is_each_row_alone() -> None:
    """Two rows of other states, norms and vision tokens, two vision pivots and one text pivot: ranked together as
    each alone (each row's count of tokens taken so far is its own)."""
    gen = torch.Generator().manual_seed(0)
    states, norms = torch.randn(2, 20, 6, generator=gen), torch.rand(2, 20, generator=gen)
    vision = torch.zeros(2, 20, dtype=torch.bool)
    vision[0, 2:14] = True
    vision[1, 4:18] = True
    real = torch.ones(2, 20, dtype=torch.bool)
    batch = duplication_ranking(states, norms, vision, real, 0.5, (2, 1))
    for row in range(2):
        alone = duplication_ranking(states[row : row + 1], norms[row : row + 1], vision[row : row + 1],
                                    real[row : row + 1], 0.5, (2, 1))  # fmt: skip
        assert torch.equal(batch[row : row + 1], alone)
    # ranked: the 2 vision pivots, then each of the 3 pivots ceil((kept - 2) / 3) more: row 0 keeps round(12 * 0.5)
    # = 6 (2 + 3 * 2 = 8 ranked), row 1 round(14 * 0.5) = 7 (2 + 3 * 2 = 8 ranked)
    assert torch.isfinite(batch).sum(1).tolist() == [8, 8]


def test_layer_cost_adds_every_ranking_cost_a_plan_declares() -> None:
    """A plan with the last-token row, a key projection and 3 similarity rows pays all three (toy model: hidden 8,
    2 heads of 4, 1 KV head; t = 4 vision + 2 text = 6 tokens): 2*6*8*1*4 + 2*8*2*4 + 2*2*6*4 = 608 for the row,
    2*6*8*1*4 = 384 for the keys, 2*3*6*8 = 288 for the similarities."""
    toy = LMDims(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)
    plan = PivotLayerPlan(scores_last_token=True, key_projection=True, similarity_rows=3)
    assert layer_cost(toy, 0, plan, 4, 2, 1, 2).scoring == 608 + 384 + 288
    assert layer_cost(toy, 0, PivotLayerPlan(key_projection=True), 4, 2, 1, 2).scoring == 384


def test_method_config_bounds_at_their_edges() -> None:
    """The smallest accepted settings are accepted and the first refused ones refused, each in one line: DART's
    K >= 1, pivots >= 1, text_pivots >= 0, keep in (0, 1]; PyramidDrop's first boundary >= 1, keep in (0, 1]."""
    assert DARTConfig(layer=1, pivots=1, text_pivots=0).layer == 1
    with pytest.raises(ValueError, match=r"DART keep 0.0 is outside \(0, 1\]"):
        DARTConfig(keep=0.0)
    assert PDropConfig(layers=[1, 4]).layers == [1, 4]
    with pytest.raises(ValueError, match=r"PyramidDrop keep 1.5 is outside \(0, 1\]"):
        PDropConfig(layers=[2, 4], keep=1.5)


@pytest.mark.parametrize("layers", [[2, 4, 9], [2, 4, 8], [8]])
def test_pdrop_boundary_at_or_past_the_last_layer_is_refused(layers: list[int]) -> None:
    """An 8-layer model has layers 0..7: a last boundary of 8 or 9 is named, whatever the boundaries before it."""
    with pytest.raises(ValueError, match=f"PyramidDrop boundary layer {layers[-1]} is beyond the model's 8 layers"):
        PDropConfig(layers=layers).layer_ratios(8)


def test_dart_rounds_its_kept_count_in_every_pruned_layer() -> None:
    """DART keeps round(n_vision * keep): 10 * 0.55 = 5.5 (5.500000000000001 in floats) -> 6, where floor gives 5;
    layers 0 and 1 (K = 2) keep all 10."""
    report = estimate(DIMS, DARTConfig(layer=2, keep=0.55), n_vision=10, n_text=4)
    assert [c.kept_vision for c in report.routed_layers] == [10, 10] + [6] * 10


def test_dart_names_a_decoder_without_a_final_norm() -> None:
    with pytest.raises(TypeError, match="DART compares hidden states under the decoder's final norm; Module has no"):
        DARTConfig().build(torch.nn.Module(), torch.nn.ModuleList(torch.nn.Identity() for _ in range(4)))


def test_fastv_describes_its_random_control() -> None:
    assert FastVConfig(ranking="random").describe(12) == "FastV K=2 keep 0.5, random ranking (a control)"
    assert FastVConfig().describe(12) == "FastV K=2 keep 0.5"


def test_pmod_budget_knob_ranges() -> None:
    """PRD and linear move beta over [-1, 1.5] (at -1 every routed layer is clamped to min_ratio, at 1.5 each is at
    max_ratio or above), the constant schedule its ratio over [1e-6, 1]; an explicit schedule has no knob."""
    assert PModConfig().budget_knob() == ("beta", -1.0, 1.5)
    assert PModConfig(schedule="linear").budget_knob() == ("beta", -1.0, 1.5)
    assert PModConfig(schedule="constant", ratio=0.5).budget_knob() == ("ratio", 1e-6, 1.0)
    assert PModConfig(schedule="explicit", ratios=[None, 0.5]).budget_knob() is None
    for schedule in ("prd", "linear"):
        low = PModConfig(schedule=schedule, beta=-1.0).layer_ratios(12)
        high = PModConfig(schedule=schedule, beta=1.5).layer_ratios(12)
        assert all(r == PModConfig().min_ratio for r in low if r is not None)
        assert all(r is None or r >= PModConfig().max_ratio for r in high)
