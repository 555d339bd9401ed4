"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core`` (see
``benchmarks/mutation/run_mutation.py`` and ``benchmarks/results/mutation.json``). Each expected value is computed by
hand in a comment next to it, never taken from the code under test."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pmod.core.compaction import build_attention_mask, compact_index, sdpa_without_cudnn
from pmod.core.schedules import layer_set, linear_ratio, linear_schedule, prd_ratio, validate_schedule


def test_a_ratio_equal_to_max_ratio_is_dense() -> None:
    # linear, 3 layers, beta 0.5: R_1 = 0.5 - 1/2 + 0.5 = 0.5 exactly (= max_ratio, so dense: "at or above");
    # R_2 = 0.5 - 1 + 0.5 = 0.0, clamped to 0.15.
    assert linear_schedule(3, max_ratio=0.5) == [None, None, 0.15]


def test_default_beta_and_short_models() -> None:
    # beta defaults to 0.5 (the paper's): R_0 = 0.5 cos(0) + 0.5 = 1.0; linear R_1 of 3 = 0.5 - 1/2 + 0.5 = 0.5.
    assert prd_ratio(0, 3) == 1.0
    assert linear_ratio(1, 3) == 0.5
    # 2 layers use the formula: linear R_1 = 0.5 - 1/1 + 0.5 = 0.0; PRD R_1 = 0.5 cos(pi) + 0.5 = 0.0.
    assert linear_ratio(1, 2) == 0.0
    assert prd_ratio(1, 2) == pytest.approx(0.0, abs=1e-12)
    # 1 layer: the formula's l = 0 value, 0.5 * 1 + beta = 0.5 + 0.25.
    assert prd_ratio(0, 1, beta=0.25) == 0.75
    assert linear_ratio(0, 1, beta=0.25) == 0.75


def test_a_bool_is_not_a_ratio() -> None:
    with pytest.raises(ValueError, match=r"Retention ratio True for layer 1 is outside \(0, 1\]"):
        validate_schedule([None, True], 2)


def test_named_and_explicit_layer_sets() -> None:
    # 5 layers: "all" is every layer but 0; "deep_all" 2..L-2; "interleave" the odd ones.
    assert layer_set("all", 5) == [1, 2, 3, 4]
    assert layer_set("deep_all", 5) == [2, 3]
    assert layer_set("interleave", 5) == [1, 3]
    # explicit indices: sorted, duplicates dropped; 0 and L-1 are valid indices, L is not.
    assert layer_set([4, 0, 2, 2], 5) == [0, 2, 4]
    with pytest.raises(ValueError, match=r"Layer indices \[5\] are outside 0\.\.4"):
        layer_set([1, 5], 5)
    with pytest.raises(ValueError, match=r"Layer indices \[-1\] are outside 0\.\.4"):
        layer_set([-1, 1], 5)


def test_attention_masks_by_hand() -> None:
    valid = torch.tensor([[True, True, True]])
    # FlashAttention: no mask when every key is valid, else the 2-D key padding mask as int32.
    assert build_attention_mask(valid, None, "flash_attention_2", torch.float32) is None
    partial = torch.tensor([[True, True, False]])
    got = build_attention_mask(partial, None, "flash_attention_3", torch.float32)
    assert got.dtype == torch.int32 and got.tolist() == [[1, 1, 0]]
    # sdpa without padding: its own causal path (no mask), for a prefill (no past) and for one query over a past.
    assert build_attention_mask(valid, None, "sdpa", torch.float32) is None
    assert build_attention_mask(valid[:, :1], valid, "sdpa", torch.float32) is None
    # sdpa with padding: a bool mask, causal and without invalid keys, but a query always sees itself (the filler in
    # slot 2 sees the valid keys before it and itself).
    mask = build_attention_mask(partial, None, "sdpa", torch.float32)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[[[True, False, False], [True, True, False], [True, True, True]]]]
    # eager always needs the additive mask: causal, 0 where allowed, the dtype's minimum elsewhere.
    low = torch.finfo(torch.float32).min
    eager = build_attention_mask(valid, None, "eager", torch.float32)
    assert eager.tolist() == [[[[0.0, low, low], [0.0, 0.0, low], [0.0, 0.0, 0.0]]]]
    bf16 = build_attention_mask(valid, None, "eager", torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16[0, 0, 0, 1] == torch.finfo(torch.bfloat16).min


def test_compact_index_by_hand() -> None:
    processed = torch.tensor([[True, False, True, False], [False, True, False, False]])
    # K = the largest count, 2: processed positions first in order, then the row's first unprocessed ones as filler.
    index, valid = compact_index(processed)
    assert index.tolist() == [[0, 2], [1, 0]] and valid.tolist() == [[True, True], [True, False]]
    index, valid = compact_index(processed, 3)
    assert index.tolist() == [[0, 2, 1], [1, 0, 2]] and valid.tolist() == [[True, True, False], [True, False, False]]


def test_no_sdpa_backend_left_but_cudnn_means_no_restriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    for name in ("flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda: False)
    assert isinstance(sdpa_without_cudnn(), contextlib.nullcontext)
