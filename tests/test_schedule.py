import math

import pytest

from pmod import PModConfig
from pmod.core.schedules import constant_schedule, kept_count, linear_schedule, mean_retention, prd_schedule


def test_prd_32_layers_hand_values():
    ratios = prd_schedule(32)
    assert ratios[:8] == [None] * 8
    # R_8 = 0.5 cos(8 pi / 31) + 0.5, computed by hand: cos(0.81073) = 0.68896
    assert ratios[8] == pytest.approx(0.844478, abs=1e-5)
    assert ratios[15] == pytest.approx(0.5 * math.cos(15 * math.pi / 31) + 0.5)
    # R_23 = 0.5 cos(23 pi / 31) + 0.5 = 0.15552 stays; R_24 = 0.12062 <= 0.15 is clamped, and so is the rest
    assert ratios[23] == pytest.approx(0.155517, abs=1e-5)
    assert ratios[24:] == [0.15] * 8
    assert mean_retention(ratios) == pytest.approx(0.5375, abs=5e-5)


def test_prd_40_layers_hand_values():
    ratios = prd_schedule(40)
    # R_9 = 0.5 cos(9 pi / 39) + 0.5 = 0.87426 >= 0.85 is dense; R_10 = 0.84636 is the first p-MoD layer
    assert ratios[:10] == [None] * 10
    assert ratios[10] == pytest.approx(0.846363, abs=1e-5)
    # R_29 = 0.15364 stays; R_30 = 0.12574 and below are clamped
    assert ratios[29] == pytest.approx(0.153636, abs=1e-5)
    assert ratios[30:] == [0.15] * 10
    assert mean_retention(ratios) == pytest.approx(0.5375, abs=5e-5)


def test_linear_and_constant():
    lin = linear_schedule(11)  # R_l = 1 - l / 10
    assert lin[:2] == [None, None]  # 1.0 and 0.9 >= 0.85
    assert lin[2] == pytest.approx(0.8)
    assert lin[8] == pytest.approx(0.2)
    assert lin[9:] == [0.15, 0.15]  # 0.1 and 0.0 are clamped
    assert constant_schedule(4, 0.5) == [None, 0.5, 0.5, 0.5]
    assert constant_schedule(4, 0.3, layers=[2]) == [None, None, 0.3, None]


def test_kept_count_floor():
    # Values where floor and round differ: 576 * R_23 of the 32-layer PRD (0.155517) = 89.58, 576 * 0.8 = 460.8,
    # 23 * 0.5 = 11.5 (round gives 12), 2880 * 0.8445 = 2432.16 (the same either way, kept as a large case).
    assert kept_count(576, 0.5 * math.cos(math.pi * 23 / 31) + 0.5) == 89
    assert kept_count(576, 0.8) == 460
    assert kept_count(23, 0.5) == 11
    assert kept_count(2880, 0.8445) == 2432
    assert kept_count(7, None) == 7
    # FastV's rounding: the nearest integer, halves to even.
    assert [kept_count(n, 0.5, "round") for n in (23, 21, 7)] == [12, 10, 4]
    assert kept_count(576, 0.8, "round") == 461


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(schedule="explicit", ratios=[None, 1.5]), "outside \\(0, 1\\]"),
        (dict(schedule="explicit", ratios=[None, 0.0]), "outside \\(0, 1\\]"),
        (dict(schedule="explicit", ratios=[None, 0.5, 0.5]), "has 3 entries but the model has 2"),
        (dict(schedule="explicit", ratios=[0.5, 0.5]), "Layer 0 cannot be a routed layer"),
        (dict(schedule="constant", ratio=0.5, layers=[0, 1]), "Layer 0 cannot be a routed layer"),
    ],
)
def test_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PModConfig(**kwargs).layer_ratios(2)


def test_config_errors_and_roundtrip():
    with pytest.raises(ValueError, match="outside \\(0, 1\\]"):
        PModConfig(schedule="constant", ratio=1.2)
    with pytest.raises(ValueError, match="Unknown p-MoD schedule"):
        PModConfig(schedule="cosine")
    cfg = PModConfig(schedule="linear", beta=0.4, weight_norm="sigmoid", string=False)
    assert PModConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown p-MoD config keys"):
        PModConfig.from_dict({"shedule": "prd"})


def test_low_beta_keeps_layer_0_dense():
    """beta 0.3 would give layer 0 a ratio of 0.8 < 0.85: layer 0 stays dense, the rest follows the formula."""
    ratios = PModConfig(beta=0.3).layer_ratios(32)
    assert ratios[0] is None
    assert ratios[1] == pytest.approx(0.5 * math.cos(math.pi / 31) + 0.3)
    assert PModConfig(schedule="linear", beta=0.2).layer_ratios(8)[:2] == [None, pytest.approx(0.5 - 1 / 7 + 0.2)]


def test_device_kept_counts_equal_the_host_rule():
    """The device-side counts (gamma-MoD's training rule, DART's budget) are ``kept_count`` per row: floor, and round
    with halves to even (23 * 0.5 = 11.5 -> 12, 25 * 0.5 = 12.5 -> 12)."""
    import torch

    from pmod.core.compaction import kept_counts

    n = torch.arange(0, 600)
    for ratio in (0.5, 0.222, 0.15, 0.8445, 1.0):
        for rounding in ("floor", "round"):
            want = [kept_count(int(v), ratio, rounding) for v in n]
            assert kept_counts(n, ratio, rounding).tolist() == want, (ratio, rounding)
    assert kept_counts(torch.tensor([23, 25]), 0.5, "round").tolist() == [12, 12]
