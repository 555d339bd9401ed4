"""One budget knob for every method (pmod.analysis.budget, pmod flops --budget): the setting chosen is at least as
close to the target as any setting of a brute-force grid over the knob's whole range."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pmod.analysis.budget import at_budget, cost_ratio
from pmod.analysis.dims import LMDims
from pmod.cli import main
from pmod.methods import DARTConfig, FastVConfig, GammaMoDConfig, MoDConfig, PDropConfig, PModConfig

DIMS = LMDims(hidden=128, layers=12, heads=4, kv_heads=4, head_dim=32, intermediate=256, vocab=64)
WORKLOAD = {"n_vision": 64, "n_text": 16}
CONFIGS = {
    "pmod": PModConfig(),
    "pmod-constant": PModConfig(schedule="constant", ratio=0.5),
    "mod": MoDConfig(),
    "fastv": FastVConfig(),
    "dart": DARTConfig(),
    "pdrop": PDropConfig(layers=[3, 6, 9]),
    "gamma_mod": GammaMoDConfig(layers=[2, 4, 6, 8]),
}


@pytest.fixture(scope="module")
def grids() -> dict[tuple[str, str], np.ndarray]:
    """Each method's cost over 401 settings spread over its knob's range, per measure."""
    out = {}
    for name, config in CONFIGS.items():
        field, low, high = config.budget_knob()
        for measure in ("tflops", "kv"):
            values = [dataclasses.replace(config, **{field: v}) for v in np.linspace(low, high, 401)]
            out[name, measure] = np.array([cost_ratio(c, DIMS, measure, **WORKLOAD) for c in values])
    return out


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("measure", ["tflops", "kv"])
def test_the_setting_chosen_is_as_close_as_any_on_the_grid(name: str, measure: str, grids) -> None:
    grid = grids[name, measure]
    field = CONFIGS[name].budget_knob()[0]
    for budget in np.linspace(grid.min(), grid.max(), 7)[1:-1]:
        chosen = at_budget(CONFIGS[name], DIMS, float(budget), measure=measure, **WORKLOAD)
        got = cost_ratio(chosen, DIMS, measure, **WORKLOAD)
        assert abs(got - budget) <= np.abs(grid - budget).min() + 1e-12, (name, budget, got)
        other = {k: v for k, v in dataclasses.asdict(chosen).items() if k != field}
        assert other == {k: v for k, v in dataclasses.asdict(CONFIGS[name]).items() if k != field}  # one knob


def test_budgets_out_of_reach_and_methods_without_a_knob_are_named() -> None:
    reach = r"fastv reaches tflops shares 0\.\d{4} to 1\.\d{4} of dense's here, not 0\.01; choose a budget in that"
    with pytest.raises(ValueError, match=reach):
        at_budget(FastVConfig(), DIMS, 0.01, **WORKLOAD)
    with pytest.raises(ValueError, match="p-MoD explicit has no budget setting"):
        at_budget(PModConfig(schedule="explicit", ratios=[None] + [0.5] * 11), DIMS, 0.5, **WORKLOAD)
    with pytest.raises(ValueError, match="budget measure 'latency' is unknown; choose one of tflops, kv"):
        at_budget(FastVConfig(), DIMS, 0.5, measure="latency", **WORKLOAD)


def test_flops_cli_budget(capsys: pytest.CaptureFixture[str]) -> None:
    """pmod flops --budget prints the setting it chose, and the table/JSON is that setting's cost."""
    args = ["flops", "--preset", "llava-1.5-7b", "--method", "fastv", "--json"]
    assert main([*args, "--budget", "0.4"]) == 0
    captured = capsys.readouterr()
    keep = float(captured.err.split("fastv keep = ")[1].split()[0])
    report = json.loads(captured.out)
    assert report["method_config"]["keep"] == pytest.approx(keep, rel=1e-5)
    assert abs(report["tflops_ratio"] - 0.4) < 0.002  # one of 576 tokens on 30 layers moves it ~0.0016
    assert main([*args, "--fastv-keep", str(keep)]) == 0
    assert json.loads(capsys.readouterr().out)["tflops_ratio"] == pytest.approx(report["tflops_ratio"], rel=1e-5)
    assert main([*args, "--budget", "0.4", "--no-lm-head"]) == 0  # the budget of the totals the table shows
    captured = capsys.readouterr()
    share = float(captured.err.split(" gives ")[1])
    assert json.loads(captured.out)["tflops_ratio"] == pytest.approx(share, abs=5e-5) and abs(share - 0.4) < 0.002
    assert main([*args, "--budget", "0.01"]) == 2
    assert capsys.readouterr().err.strip().startswith("pmod flops: error: --budget 0.01: fastv reaches tflops")
