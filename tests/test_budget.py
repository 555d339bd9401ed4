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


#: Each method's trained-model budget test: a target it reaches (p-MoD's at PRD's beta would route layer 1 too).
TARGETS = {"pmod": 0.45, "mod": 0.7, "gamma_mod": 0.7, "fastv": 0.45}
TRAINED = {
    "pmod": PModConfig(),
    "mod": MoDConfig(ratio=0.5),
    "gamma_mod": GammaMoDConfig(layers=[1, 2, 3, 4, 5, 6, 7]),
}


@pytest.mark.parametrize("method", [*TRAINED, "fastv"])
def test_set_budget_runs_the_model_as_one_converted_at_that_setting(method: str, tmp_path) -> None:
    """A converted model moved to another share of dense's TFLOPs (pmod.set_budget) gives the logits of the dense
    model converted afresh with the config it reports, the same routers copied in; a trained method keeps exactly its
    routed layers (p-MoD's PRD at that budget would route other ones), the cost is the budget to within one kept-token
    step, and the folder it saves reloads at that budget."""
    import torch

    import pmod
    from pmod.analysis.budget import set_budget
    from pmod.testing import llava_batch, randomize_routers, tiny_llava

    config = TRAINED.get(method, FastVConfig())
    model = pmod.convert(tiny_llava(num_layers=8), config)
    randomize_routers(model)
    before = pmod.routed_layers(model).keys()
    chosen = set_budget(model, TARGETS[method], n_vision=64, n_text=16)
    dims = LMDims.from_config(model.config)
    share = cost_ratio(chosen, dims, "tflops", n_vision=64, n_text=16)
    # One kept token more or less in every routed layer moves the cost by at most this much:
    step = 2.5 * len(before) / dims.layers / 64
    assert abs(share - TARGETS[method]) <= step and pmod.routed_layers(model).keys() == before
    assert pmod.get_method_config(model) == chosen and pmod.layer_ratios(model) == chosen.layer_ratios(8)
    if method == "pmod":
        assert chosen.schedule == "explicit" and all((r is None) == (i not in before) for i, r in
                                                     enumerate(chosen.ratios))  # fmt: skip
        prd = at_budget(config, dims, TARGETS[method], n_vision=64, n_text=16).layer_ratios(8)  # beta moved instead
        assert {i for i, r in enumerate(prd) if r is not None} != set(before)
    fresh = pmod.convert(tiny_llava(num_layers=8), chosen)
    fresh.load_state_dict(model.state_dict())
    batch = llava_batch(model, [(3, 5), (6, 2)], [True, True], padding_side="left")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, fresh(**batch).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert pmod.layer_ratios(pmod.load(tmp_path)) == chosen.layer_ratios(8)


def test_set_budget_refuses_a_dense_model_and_a_budget_out_of_reach() -> None:
    import pmod
    from pmod.analysis.budget import set_budget
    from pmod.testing import tiny_llava

    with pytest.raises(ValueError, match="routes no decoder layer"):
        set_budget(tiny_llava(num_layers=4), 0.5, n_vision=64)
    model = pmod.convert(tiny_llava(num_layers=8), MoDConfig(ratio=0.5))
    with pytest.raises(ValueError, match=r"mod with its routed layers reaches tflops shares 0\.\d+ to 1\.\d+ "):
        set_budget(model, 0.05, n_vision=64, n_text=16)
    assert pmod.get_method_config(model) == MoDConfig(ratio=0.5).resolved(8)  # nothing changed
