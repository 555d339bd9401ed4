"""`pmod eval --budgets` (issue 26) on tiny dense and p-MoD folders with the local shapes task: each routed model
(a p-MoD folder, FastV on the dense folder) runs at every budget, named MODEL@0.xx, with the TFLOPs pmod.set_budget's
choice gives on the requests it answered; dense is one row; the bootstrap intervals stay; one curve per model; and
one-line refusals before anything loads."""

import json
import re

import pytest

pytest.importorskip("lmms_eval")

import pmod  # noqa: E402
from pmod.analysis.analytic_flops import estimate  # noqa: E402
from pmod.analysis.dims import LMDims  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.data import synth  # noqa: E402
from pmod.testing import tiny_llava_folder  # noqa: E402

TASK, LIMIT, N_TEXT = "pmod_shapes_mc", 4, 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-budgets")
    dense = tiny_llava_folder(str(root / "dense"))
    routed = tiny_llava_folder(str(root / "pmod"), method_config=pmod.PModConfig(), seed=1)
    data = root / "data"
    synth.generate(data, 60, seed=0, image_size=32, test_fraction=0.2)
    return root, dense, routed, data


def n_vision(folder: str) -> int:
    """One image's vision tokens, from the tower's sizes: (image_size / patch_size)^2."""
    vision = json.loads(open(f"{folder}/config.json").read())["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2


def reach(model, folder: str) -> tuple[float, float]:
    """The TFLOPs shares set_budget can reach on ``model``, read from its own refusal."""
    with pytest.raises(ValueError) as err:
        pmod.set_budget(model, 0.001, n_vision=n_vision(folder), n_text=N_TEXT)
    low, high = re.search(r"shares (\S+) to (\S+) of dense's", str(err.value)).groups()
    return float(low), float(high)


def run_eval(setup, models, out, capsys, *extra) -> tuple[int, str]:
    root, dense, routed, data = setup
    argv = ["eval", *(x for m in models for x in ("--model", m)), "--tasks", TASK, "--limit", str(LIMIT),
            "--shapes-data", str(data), "--out", str(out), "--device", "cpu", *extra]  # fmt: skip
    rc = main(argv)
    return rc, capsys.readouterr().err


def fresh(setup, method: str | None):
    """The model the row of ``method`` (None: the p-MoD folder, fastv: FastV on the dense folder) starts from."""
    root, dense, routed, data = setup
    if method is None:
        return pmod.load(routed), routed
    return pmod.convert(pmod.load(dense), pmod.FastVConfig()), dense


def test_every_routed_model_at_every_budget(setup, tmp_path, capsys):
    root, dense, routed, data = setup
    low = max(reach(*fresh(setup, None))[0], reach(*fresh(setup, "fastv"))[0])
    budgets = [round(low + (1 - low) * f, 2) for f in (0.3, 0.7)]
    out = tmp_path / "out"
    rc, log = run_eval(setup, [dense, routed, f"{dense},method=fastv"], out, capsys,
                       "--budgets", ",".join(map(str, budgets)))  # fmt: skip
    assert rc == 0, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in report["tasks"][TASK]}
    names = [f"{m}@{b:.2f}" for m in ("pmod", "dense+fastv") for b in budgets]
    assert list(rows) == ["dense", *names]
    for method in (None, "fastv"):
        for b in budgets:
            row = rows[f"{'pmod' if method is None else 'dense+fastv'}@{b:.2f}"]
            model, folder = fresh(setup, method)
            chosen = pmod.set_budget(model, b, n_vision=n_vision(folder), n_text=N_TEXT)
            costs = [json.loads(line) for line in (out / row["result"] / "costs" / "requests.rank0.jsonl")
                     .read_text().splitlines()]  # fmt: skip
            dims = LMDims.from_config(model.config)
            spent = [estimate(dims, chosen, n_vision=c["n_vision"], n_text=c["n_text"]) for c in costs]
            share = sum(r.routed_flops for r in spent) / sum(r.dense_flops for r in spent)
            assert len({c["doc_id"] for c in costs}) == LIMIT
            assert row["tflops_ratio"] == pytest.approx(share, rel=1e-9), (b, method)
            assert share < 1 - 1e-3 and f"{row['model']}: {chosen.describe(dims.layers)}" in log
            assert row["paired_documents"] == LIMIT and row["ci_low"] <= row["delta"] <= row["ci_high"]
    from pmod.eval.budgets import curves, curves_figure

    for measure, key in (("tflops", "tflops_ratio"), ("kv", "kv_ratio"), ("latency", "latency_ratio")):
        assert (out / f"accuracy_vs_{measure}.png").stat().st_size > 0
        (ax,) = curves_figure(report, measure).axes
        lines = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}
        drawn = {name: sorted(points) for name, points in curves(report, report["tasks"][TASK], measure).items()}
        assert lines == drawn  # the figure draws what curves gathers
        assert lines.keys() == {"dense", "pmod", "dense+fastv"}
        assert lines["dense"] == [(100.0, rows["dense"]["score"])]  # dense, the reference, at 100%
        for name in ("pmod", "dense+fastv"):
            picked = [rows[f"{name}@{b:.2f}"] for b in budgets]
            assert all(r[key] is not None for r in picked), (measure, picked)  # measured on every row
            expected = sorted((100 * r[key], r["score"]) for r in picked)
            if measure == "tflops":  # TFLOPs: of dense's, the reference here, to the last bits of a division
                assert [v for p in lines[name] for v in p] == pytest.approx([v for p in expected for v in p], rel=1e-9)
            else:  # KV and latency: the report's own ratios, exactly
                assert lines[name] == expected, measure
    assert ax.get_xlabel() == "prefill latency, measured (median per-document % of dense's)"


@pytest.mark.parametrize(
    ("models", "flags", "message"),
    [
        (["{routed}"], ("--budgets", "0.5,x"), "--budgets 0.5,x: give shares of dense's TFLOPs separated by commas"),
        (["{routed}"], ("--budgets", "0.5,1.5"), r"--budgets 0.5,1.5: each budget is a share of dense's TFLOPs in \(0"),
        (["{routed}"], ("--budgets", "0.01"), r"{routed} at budget 0.01: pmod with its routed layers reaches tflops "
                                              r"shares 0\.\d+ to 1\.\d+ of dense's here, not 0.01; choose a budget"),
        (["{dense},budget=0.5"], (), "budget=0.5: {dense} is a dense model, with no budget to set"),
        (["{routed},budget=0.5"], ("--budgets", "0.5"), "--model {routed} has budget= and --budgets is given"),
    ],
)
def test_bad_budgets_are_refused_before_anything_loads(setup, tmp_path, capsys, models, flags, message):
    root, dense, routed, data = setup
    models = [m.format(dense=dense, routed=routed) for m in models]
    rc, log = run_eval(setup, models, tmp_path / "out", capsys, *flags)
    assert rc == 2 and re.fullmatch(f"pmod eval: error: {message.format(dense=dense, routed=routed)}.*\n", log), log
    assert not (tmp_path / "out").exists()


def test_the_latency_plot_names_a_latency_warning():
    """A row whose latency ratio carries the report's warning: the latency figure says so, the others do not; the
    reference sits at 100% and a row without a ratio is left out."""
    from pmod.eval.budgets import curves, curves_figure

    rows = [{"model": "dense", "metric": "acc", "score": 0.5, "prefill_tflops": 2.0, "dense_prefill_tflops": 2.0},
            {"model": "fastv@0.40", "metric": "acc", "score": 0.25, "prefill_tflops": 1.0, "dense_prefill_tflops": 2.0,
             "kv_ratio": 0.375, "latency_ratio": 0.625, "latency_warning": "too few timings"},
            {"model": "fastv@0.60", "metric": "acc", "score": 0.375, "prefill_tflops": 1.5,
             "dense_prefill_tflops": 2.0, "kv_ratio": None, "latency_ratio": 0.75}]  # fmt: skip
    report = {"reference": "dense", "models": {"dense": "d", "fastv@0.40": "d", "fastv@0.60": "d"},
              "model_args": {"dense": {}, "fastv@0.40": {"method": "fastv", "budget": "0.4"},
                             "fastv@0.60": {"method": "fastv", "budget": "0.6"}}, "tasks": {"t": rows}}  # fmt: skip
    assert curves(report, rows, "kv") == {"dense": [(100.0, 0.5)], "fastv": [(37.5, 0.25)]}
    assert curves(report, rows, "latency") == {"dense": [(100.0, 0.5)], "fastv": [(62.5, 0.25), (75.0, 0.375)]}
    assert curves(report, rows, "tflops") == {"dense": [(100.0, 0.5)], "fastv": [(50.0, 0.25), (75.0, 0.375)]}
    assert "latency ratios carry a warning in report.md" in curves_figure(report, "latency").texts[0].get_text()
    assert not curves_figure(report, "kv").texts
