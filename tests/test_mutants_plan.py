"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core.plan``,
``pmod.core.layer_masks`` and ``pmod.core.compat`` (issue 22's code; see ``benchmarks/mutation/run_mutation.py``).
Every expected value is worked out by hand in the comments, never read back from the code under test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, StaticCache

from pmod.core.cache import as_routed_cache
from pmod.core.compat import full_attention_mask, has_vision_inputs
from pmod.core.convert import real_tokens
from pmod.core.layer_masks import causal_mask, compacted_mask, every_token_mask, static_mask
from pmod.core.plan import VISION, ForwardPlan, Selection
from pmod.testing import tiny_llama

# Two rows of 6 tokens. Row 0: no padding, candidates at 1..4. Row 1: padding at 0 (marked a candidate too, which the
# plan must ignore), candidates at 2..4.
REAL = torch.tensor([[True] * 6, [False] + [True] * 5])
CANDIDATES = torch.tensor([[False, True, True, True, True, False], [True, False, True, True, True, False]])
SCORES = torch.tensor([[0.0, 0.1, 0.9, 0.3, 0.8, 0.0], [9.0, 0.0, 0.2, 0.7, 0.1, 0.0]]).view(2, 6, 1)


def select(plan: ForwardPlan, ratio: float = 0.5, rounding: str = "floor", scores: torch.Tensor = SCORES):
    return plan.select(VISION, lambda: CANDIDATES, scores, ratio, rounding)


def test_selection_keeps_the_best_candidates_and_every_real_non_candidate() -> None:
    # Row 0: 4 candidates, floor(0.5 * 4) = 2 kept, the best two are 2 (0.9) and 4 (0.8); non-candidates 0 and 5
    # always run: [0, 2, 4, 5], 4 slots. Row 1: 3 real candidates (2, 3, 4), floor(1.5) = 1 kept: 3 (0.7); real
    # non-candidates 1 and 5: [1, 3, 5] and one filler slot. The filler is the next-ranked token, 2 (0.2): ranked
    # [1, 5 (+inf), 3, 2], with the filler's offset +6 sorted last, then taken modulo 6.
    sel = select(ForwardPlan(REAL))
    assert sel.index.shape == (2, 4, 1)
    assert sel.index[..., 0].tolist() == [[0, 2, 4, 5], [1, 3, 5, 2]]
    assert sel.valid[..., 0].tolist() == [[True] * 4, [True, True, True, False]]
    assert (sel.slots, sel.total) == (4, 7)


def test_round_keeps_the_nearest_count() -> None:
    # round(0.4 * 4) = round(1.6) = 2 in row 0 (floor: 1); round(0.4 * 3) = round(1.2) = 1 in row 1 (floor: 1).
    # Row 0: 2 + 2 = 4 slots ([0, 2, 4, 5]); row 1: 2 + 1 = 3 real slots.
    sel = select(ForwardPlan(REAL), ratio=0.4, rounding="round")
    assert sel.index[0, :, 0].tolist() == [0, 2, 4, 5] and (sel.slots, sel.total) == (4, 7)
    floor = select(ForwardPlan(REAL), ratio=0.4)
    # floor: row 0 keeps 1 candidate (2), row 1 keeps 1 (3): 3 slots each, no filler.
    assert floor.index[..., 0].tolist() == [[0, 2, 5], [1, 3, 5]] and floor.valid is None
    assert (floor.slots, floor.total) == (3, 6)


def test_equal_scores_keep_the_lower_position() -> None:
    # Every candidate scores 1: the stable sort keeps the lowest positions, 1 and 2 in row 0, 2 in row 1.
    sel = select(ForwardPlan(REAL), scores=torch.ones(2, 6, 1))
    assert sel.index[..., 0].tolist() == [[0, 1, 2, 5], [1, 2, 5, 3]]


def test_ties_among_many_tokens_keep_the_lower_positions() -> None:
    # 128 candidates scoring 0 or 1 (many ties; an unstable sort reorders ties at this length on a CPU): floor(0.3 *
    # 128) = 38 kept, the ones with the best (score, -position), worked out with Python's sorted.
    scores = (torch.arange(128) * 7 % 3 == 0).float().view(1, 128, 1)
    sel = ForwardPlan(None).select(VISION, lambda: torch.ones(1, 128, dtype=torch.bool), scores, 0.3)
    expected = sorted(sorted(range(128), key=lambda i: (-scores[0, i, 0].item(), i))[:38])
    assert sel.index[0, :, 0].tolist() == expected


def test_every_token_kept_is_no_selection_unless_there_is_padding() -> None:
    assert select(ForwardPlan(None), ratio=1.0) is None  # no padding, every candidate kept: the whole sequence
    sel = select(ForwardPlan(REAL), ratio=1.0)  # row 1's padding token is left out: 6 and 5 real tokens
    assert sel.index[..., 0].tolist() == [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]]
    assert sel.valid[1, :, 0].tolist() == [True] * 5 + [False] and sel.total == 11


def test_a_forward_without_candidates_runs_every_real_token() -> None:
    plan = ForwardPlan(None)
    assert plan.select("text", lambda: None, SCORES, 0.5) is None
    assert plan.candidates("text", lambda: None, SCORES).shape == (2, 6, 1)
    assert not plan.candidates("text", lambda: None, SCORES).any()
    sel = ForwardPlan(REAL).select("text", lambda: None, SCORES, 0.5)  # only the padding is left out
    assert sel.index[..., 0].tolist() == [[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]] and sel.total == 11


def test_candidates_are_real_tokens_only() -> None:
    plan = ForwardPlan(REAL)
    expected = [[False, True, True, True, True, False], [False, False, True, True, True, False]]
    assert plan.candidates(VISION, lambda: CANDIDATES, SCORES)[..., 0].tolist() == expected


def test_listed_ratios_and_caller_counts_give_the_same_selection() -> None:
    plain = select(ForwardPlan(REAL))
    listed = select(ForwardPlan(REAL, ratios=((0.5, "floor"), (0.25, "round"))))
    told = select(ForwardPlan(REAL, counts={VISION: [4, 3], "real": [6, 5]}))
    for sel in (listed, told):
        assert torch.equal(sel.index, plain.index) and torch.equal(sel.valid, plain.valid)
        assert (sel.slots, sel.total) == (plain.slots, plain.total)


def test_caller_counts_are_trusted_when_complete() -> None:
    # Told 2 candidates per row (the masks say 4 and 3): floor(0.5 * 2) = 1 kept. Rows: 6 - 2 + 1 = 5 and 5 - 2 + 1
    # = 4 processed tokens.
    sel = select(ForwardPlan(REAL, counts={VISION: [2, 2], "real": [6, 5]}))
    assert (sel.slots, sel.total) == (5, 9)
    assert sel.valid[..., 0].sum(1).tolist() == [5, 4]
    # Without padding no real count is needed: each row has 6 tokens, 6 - 2 + 1 = 5.
    sel = select(ForwardPlan(None, counts={VISION: [2, 2]}))
    assert (sel.slots, sel.total, sel.valid) == (5, 10, None)
    # With padding but no real counts told, both are read from the masks: the plain selection (4 slots, 7 tokens).
    sel = select(ForwardPlan(REAL, counts={VISION: [2, 2]}))
    assert (sel.slots, sel.total) == (4, 7)


def test_caller_counts_of_unequal_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="zip"):  # 2 rows of candidates, 1 of real tokens: a caller's mistake
        select(ForwardPlan(REAL, counts={VISION: [4, 3], "real": [6]}))


def test_the_same_scores_are_selected_once() -> None:
    plan = ForwardPlan(REAL)
    first = select(plan)
    assert select(plan) is first
    assert select(plan, scores=SCORES.clone()) is not first
    assert select(plan, ratio=0.25) is not first


def test_select_mask_compacts_a_data_dependent_mask() -> None:
    processed = torch.tensor([[True, False, True, True], [False, True, False, False]])
    sel = ForwardPlan(None).select_mask(processed)
    # Row 0 runs 0, 2, 3; row 1 runs 1, then its first unprocessed positions fill the slots: 0, 2.
    assert sel.index[..., 0].tolist() == [[0, 2, 3], [1, 0, 2]]
    assert sel.valid[..., 0].tolist() == [[True] * 3, [True, False, False]]
    assert (sel.slots, sel.total) == (3, 4)
    equal = ForwardPlan(None).select_mask(torch.tensor([[True, False, True], [False, True, True]]))
    assert equal.index[..., 0].tolist() == [[0, 2], [1, 2]] and equal.valid is None and equal.total == 4
    assert ForwardPlan(None).select_mask(torch.ones(2, 3, dtype=torch.bool)) is None


def test_rank_fill_and_token_valid() -> None:
    fill = ForwardPlan(None).rank_fill(SCORES)
    assert fill.shape == (1, 1, 1) and fill.item() == float("inf")
    assert ForwardPlan(None).token_valid() is None
    plan = ForwardPlan(REAL)
    assert plan.rank_fill(SCORES)[1, :, 0].tolist() == [float("-inf")] + [float("inf")] * 5
    assert plan.token_valid().shape == (2, 1, 1, 6) and plan.token_valid()[1, 0, 0].tolist() == REAL[1].tolist()
    assert plan.token_valid() is plan.token_valid()


def test_shared_makes_once_per_key() -> None:
    plan, made = ForwardPlan(None), []
    assert plan.shared("a", lambda: made.append(1) or "x") == "x"
    assert plan.shared("a", lambda: made.append(2) or "y") == "x"
    assert plan.shared("b", lambda: made.append(3) or "z") == "z"
    assert made == [1, 3]


def fake_layer(implementation: str, index: int = 1) -> SimpleNamespace:
    """What the mask functions read of a decoder layer: its index and its attention implementation."""
    return SimpleNamespace(routed_layer_idx=index, self_attn=SimpleNamespace(config=SimpleNamespace(
        _attn_implementation=implementation)))  # fmt: skip


def static_cache(rows: int = 2, size: int = 5):
    """A static cache of tiny_llama (2 KV heads of 16 dims) for ``rows`` rows and ``size`` slots per layer."""
    return as_routed_cache(StaticCache(config=tiny_llama(num_layers=2).config, max_cache_len=size))


#: Layer 1 prefills 3 slots, the middle one of row 0 and the last of row 1 fillers.
PREFILL_VALID = torch.tensor([[True, False, True], [True, True, False]]).view(2, 1, 1, 3)


def prefill_then_step(implementation: str, dtype: torch.dtype = torch.float16):
    """The static masks of a prefill (3 slots, model mask given) and of the next one-token step, of layer 1."""
    cache, layer, like = static_cache(), fake_layer(implementation), torch.zeros(2, 3, 4, dtype=dtype)
    model_mask = torch.zeros(2, 1, 3, 5)
    first = static_mask(layer, cache, PREFILL_VALID, 3, like, model_mask)
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 1)  # what the attention then caches
    return first, model_mask, static_mask(layer, cache, None, 1, like[:, :1], None)


def test_static_decode_masks_of_eager_and_sdpa() -> None:
    # After the prefill the record is [T, F, T, -, -] and [T, T, F, -, -]; the step writes slot 3 (all real).
    first, model_mask, step = prefill_then_step("eager")
    assert first is model_mask
    low = torch.finfo(torch.float16).min  # -65504: eager's additive mask, in the hidden states' dtype
    assert step.dtype == torch.float16 and step.shape == (2, 1, 1, 5)
    assert step[:, 0, 0].tolist() == [[0, low, 0, 0, low], [0, 0, low, 0, low]]
    first, model_mask, step = prefill_then_step("sdpa")
    assert first is model_mask
    assert step.dtype == torch.bool and step[:, 0, 0].tolist() == [[True, False, True, True, False],
                                                                    [True, True, False, True, False]]  # fmt: skip


def test_static_masks_of_flash_attention_are_the_record_as_key_mask() -> None:
    cache, layer, like = static_cache(), fake_layer("flash_attention_2"), torch.zeros(2, 3, 4)
    first = static_mask(layer, cache, PREFILL_VALID, 3, like, torch.zeros(2, 1, 3, 5))
    assert first.shape == (2, 5) and first.tolist() == [[True, False, True, False, False],
                                                        [True, True, False, False, False]]  # fmt: skip
    cache.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 1)
    step = static_mask(layer, cache, None, 1, like[:, :1], None)
    assert step.tolist() == [[True, False, True, True, False], [True, True, False, True, False]]


def test_a_static_prefill_without_a_model_mask_needs_sdpa() -> None:
    like = torch.zeros(2, 3, 4)
    assert static_mask(fake_layer("sdpa"), static_cache(), PREFILL_VALID, 3, like, None) is None
    with pytest.raises(ValueError, match="static cache runs with sdpa or flash attention, not 'eager'"):
        static_mask(fake_layer("eager"), static_cache(), PREFILL_VALID, 3, like, None)


def test_vision_inputs_are_the_ones_given_and_not_none() -> None:
    image = torch.zeros(1, 3, 2, 2)
    assert not has_vision_inputs({}) and not has_vision_inputs({"input_ids": image})
    assert not has_vision_inputs({"pixel_values": None, "pixel_values_videos": None, "mm_encoder_outputs": None})
    for name in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs"):
        assert has_vision_inputs({name: image, "pixel_values" if name != "pixel_values" else "other": None}), name


def test_a_static_prefill_of_every_token_marks_them_all_written() -> None:
    cache = static_cache()
    cache.write_slots(1, None, 3, torch.zeros(2, 3, 4))
    assert cache.slot_mask(1).tolist() == [[True, True, True, False, False]] * 2


def test_eager_causal_mask_of_the_compacted_slots() -> None:
    low = torch.finfo(torch.float16).min
    mask = causal_mask(3, torch.float16, torch.device("cpu"))
    # [1, 1, K, K] as transformers' attention functions take it; slot i sees slots 0..i.
    assert mask.dtype == torch.float16 and mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].tolist() == [[0, low, low], [0, 0, low], [0, 0, 0]]


def test_a_one_token_step_of_every_token_extends_the_slot_record() -> None:
    # Layer 1 cached 2 slots per row in the prefill, (T, F) and (T, T); a decode step without padding (no model
    # mask) runs its one token in every row: the record grows by a real slot, and is the step's key mask (sdpa).
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(2, 1, 3, 2), torch.zeros(2, 1, 3, 2), 0)  # the dense layer 0
    cache.extend_slots(1, torch.tensor([[True, False], [True, True]]).view(2, 1, 1, 2), 2, 2)
    cache.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), 1)
    mask = every_token_mask(fake_layer("sdpa"), None, cache, ForwardPlan(None), torch.zeros(2, 1, 4))
    assert mask.dtype == torch.bool and mask[:, 0, 0].tolist() == [[True, False, True], [True, True, True]]
    assert cache.slot_mask(1).tolist() == [[True, False, True], [True, True, True]]


def routed_layer_cache(record: torch.Tensor | None) -> DynamicCache:
    """Dense layer 0 with 2 tokens per row; layer 1 with 2 cached slots per row, recorded as ``record`` [2, 2]."""
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), 0)
    cache.extend_slots(1, None if record is None else record.view(2, 1, 1, 2), 2, 2)
    cache.update(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), 1)
    return cache


def test_a_chunk_of_every_token_over_a_cache_masks_its_padding() -> None:
    # Cached (T, F) and (T, T); the new 2-token chunk has padding at row 0's second token. Flash attention's key mask
    # is the validity of all 4 keys: (T, F, T, F) and (T, T, T, T).
    cache = routed_layer_cache(torch.tensor([[True, False], [True, True]]))
    real = torch.tensor([[True, False], [True, True]])
    mask = every_token_mask(fake_layer("flash_attention_2"), torch.zeros(2, 1, 2, 4), cache, ForwardPlan(real),
                            torch.zeros(2, 2, 4))  # fmt: skip
    assert mask.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1]]


def test_a_chunk_of_every_token_over_an_all_real_cache() -> None:
    # No record, no padding: eager's causal mask of queries at positions 2 and 3 over keys 0..3.
    low = torch.finfo(torch.float32).min
    mask = every_token_mask(
        fake_layer("eager"), None, routed_layer_cache(None), ForwardPlan(None), torch.zeros(2, 2, 4)
    )
    assert mask.shape == (2, 1, 2, 4) and mask[:, 0].tolist() == [[[0, 0, 0, low], [0, 0, 0, 0]]] * 2


def test_slots_recorded_after_all_real_ones_extend_them() -> None:
    # Layer 1 holds 2 real slots per row and no record; 2 new slots (T, F) and (F, T) make the record 4 slots long.
    cache = routed_layer_cache(None)
    before, after = cache.extend_slots(1, torch.tensor([[True, False], [False, True]]).view(2, 1, 1, 2), 2, 2)
    assert before[:, 0, 0].tolist() == [[True, True]] * 2
    assert after.dtype == torch.bool
    assert after[:, 0, 0].tolist() == [[True, True, True, False], [True, True, False, True]]
    with pytest.raises(ValueError, match="The cache holds 2 rows but the batch has 3"):
        cache.extend_slots(1, None, 1, 3)


def test_a_compacted_step_without_fillers_records_real_slots() -> None:
    # One slot per row (no filler, valid None) over the record (T, F), (T, T): it grows by a real slot.
    cache = routed_layer_cache(torch.tensor([[True, False], [True, True]]))
    selection = Selection(torch.zeros(2, 1, 1, dtype=torch.long), None, 1, 2)
    compacted_mask(fake_layer("sdpa"), cache, 2, selection, ForwardPlan(None), torch.float32)
    assert cache.slot_mask(1).tolist() == [[True, False, True], [True, True, True]]


def test_compacted_slots_with_fillers_over_a_cache_mask_the_fillers() -> None:
    # Two slots per row over the record (T, F), (T, T); row 0's second slot is a filler. Flash attention's key mask:
    # (T, F, T, F) and (T, T, T, T).
    cache = routed_layer_cache(torch.tensor([[True, False], [True, True]]))
    valid = torch.tensor([[True, False], [True, True]]).view(2, 2, 1)
    selection = Selection(torch.tensor([[0, 1], [0, 1]]).view(2, 2, 1), valid, 2, 3)
    mask = compacted_mask(fake_layer("flash_attention_2"), cache, 2, selection, ForwardPlan(None), torch.float32)
    assert mask.tolist() == [[1, 0, 1, 0], [1, 1, 1, 1]]


def test_a_one_element_cache_is_not_empty() -> None:
    # 1 row, 1 head, 1 token, dim 1: one element, but a cached row all the same; a batch of 2 is refused.
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
    with pytest.raises(ValueError, match="The cache holds 1 rows but the batch has 2"):
        cache.extend_slots(0, None, 1, 2)


CPU = torch.device("cpu")


def test_real_tokens_of_a_padding_mask() -> None:
    assert real_tokens(None, 3, None, CPU) == (None, 3)
    # [B, past + seq] = [2, 5]: the chunk is the last 3 columns; the key length is 5.
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]])
    real, keys = real_tokens(mask, 3, None, CPU)
    assert real.dtype == torch.bool and real.tolist() == [[True, True, True], [True, False, True]] and keys == 5


def test_real_tokens_of_generates_4d_masks() -> None:
    # 2 rows, 3 new tokens over 2 cached keys (5 keys). A token is real when it may attend to itself: its column
    # keys - seq + i. Row 1's middle token is padding: its own column (3) is blocked.
    low = torch.finfo(torch.float32).min
    allowed = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(2)  # query i sees keys 0..2 + i
    allowed[1, 0, :, 3] = False
    additive = torch.zeros(2, 1, 3, 5).masked_fill(~allowed, low)
    for mask in (allowed, additive):
        real, keys = real_tokens(mask, 3, None, CPU)
        assert real.dtype == torch.bool and real.tolist() == [[True] * 3, [True, False, True]] and keys == 5
    assert real_tokens(additive[:, :, :1], 1, None, CPU) == (None, 5)  # a decoded token is real
    # A static cache's prefill: the keys are the whole buffer (5), the chunk's own columns start at 0.
    static = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril()
    static[0, 0, :, 1] = False
    real, keys = real_tokens(static, 3, SimpleNamespace(is_compileable=True), CPU)
    assert real.tolist() == [[True, False, True], [True] * 3] and keys == 5
    with pytest.raises(ValueError, match="routed models take a 2-D padding attention_mask .* got 3-D"):
        real_tokens(torch.ones(2, 3, 5), 3, None, CPU)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_flash_attention_step_of_every_token_takes_the_record_without_a_host_check(device: str) -> None:
    # Layer 1 holds 2 slots per row recorded (T, F) and (T, T); a one-token step without padding adds a real slot:
    # flash attention's 2-D int32 key padding mask is the record, (1, 0, 1) and (1, 1, 1). On the meta device no
    # value can be read on the host: the step must not check the mask there (a device sync per step on CUDA).
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(2, 1, 2, 2, device=device), torch.zeros(2, 1, 2, 2, device=device), 0)
    cache.extend_slots(1, torch.tensor([[True, False], [True, True]], device=device).view(2, 1, 1, 2), 2, 2)
    cache.update(torch.zeros(2, 1, 2, 2, device=device), torch.zeros(2, 1, 2, 2, device=device), 1)
    mask = every_token_mask(fake_layer("flash_attention_2"), None, cache, ForwardPlan(None),
                            torch.zeros(2, 1, 4, device=device))  # fmt: skip
    assert mask.dtype == torch.int32 and mask.shape == (2, 3)
    if device == "cpu":
        assert mask.tolist() == [[1, 0, 1], [1, 1, 1]]


def test_masks_are_made_on_the_device_of_the_inputs() -> None:
    # The meta device stands in for a GPU: a mask made on the default device (the CPU) instead of the inputs' would
    # end up on another device than the attention's tensors. Layer 1 holds 2 real slots per row (no record).
    meta = torch.device("meta")
    cache = as_routed_cache(DynamicCache())
    cache.update(torch.zeros(2, 1, 2, 2, device=meta), torch.zeros(2, 1, 2, 2, device=meta), 0)
    cache.extend_slots(1, None, 2, 2)
    cache.update(torch.zeros(2, 1, 2, 2, device=meta), torch.zeros(2, 1, 2, 2, device=meta), 1)
    layer = fake_layer("eager")
    every = every_token_mask(layer, None, cache, ForwardPlan(None), torch.zeros(2, 2, 4, device=meta))
    assert every.device == meta and every.shape == (2, 1, 2, 4)  # 2 queries over 2 + 2 keys
    selection = Selection(torch.zeros(2, 3, 1, dtype=torch.long, device=meta), None, 3, 6)
    causal = compacted_mask(layer, None, 0, selection, ForwardPlan(None), torch.float32)
    assert causal.device == meta and causal.shape == (1, 1, 3, 3)
    over = compacted_mask(layer, cache, 4, selection, ForwardPlan(None), torch.float32)
    assert over.device == meta and over.shape == (2, 1, 3, 7)  # 3 slots over the 4 cached and themselves


def test_static_records_and_masks_are_made_on_the_device_of_the_inputs() -> None:
    # As above for the static cache: the prefill's record and the eager decode step's mask follow the hidden states.
    meta = torch.device("meta")
    cache, layer = static_cache(), fake_layer("eager")
    like = torch.zeros(2, 3, 4, dtype=torch.float16, device=meta)
    static_mask(layer, cache, PREFILL_VALID.to(meta), 3, like, torch.zeros(2, 1, 3, 5, device=meta))
    assert cache.slot_mask(1).device == meta
    cache.update(torch.zeros(2, 2, 3, 16, device=meta), torch.zeros(2, 2, 3, 16, device=meta), 1)
    step = static_mask(layer, cache, None, 1, like[:, :1], None)
    assert step.device == meta and step.dtype == torch.float16 and step.shape == (2, 1, 1, 5)


def test_the_full_attention_entry_of_a_mask_per_layer_type() -> None:
    # generate's dict for a static cache (some releases): the "full_attention" entry, wherever it is; else the first.
    full, sliding = torch.ones(1, 3), torch.zeros(1, 3)
    assert full_attention_mask({"sliding_attention": sliding, "full_attention": full}) is full
    assert full_attention_mask({"sliding_attention": sliding}) is sliding
    assert full_attention_mask({}) is None and full_attention_mask(full) is full
