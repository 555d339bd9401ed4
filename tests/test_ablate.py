"""`pmod ablate` on a tiny setting: the report's numbers against the per-unit results, processed tokens against the
analytic counts, the FLOPs-matching solvers, identical reruns, and a killed run that resumes to the same report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_ablation as tiny_settings

import pmod
from pmod.analysis.analytic_flops import estimate
from pmod.analysis.dims import LMDims
from pmod.cli import main
from pmod.core import schedules
from pmod.core.config import method_class
from pmod.experiments.ablate import AblateSettings
from pmod.experiments.ablate_variants import (
    VARIANTS,
    Workload,
    dart_at_budget,
    fastv_at_budget,
    mod_at_budget,
    pdrop_at_budget,
    pdrop_boundaries,
    variant_configs,
)
from pmod.experiments.demo import DemoSettings

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
#: Fields that are measured wall times, not results: they differ between any two runs.
TIMINGS = {"train_seconds", "train_cpu_seconds", "prefill_ms", "latency_ratio"}


@pytest.fixture(scope="module")
def run(quick_ablation):
    """`pmod ablate --quick` with the quick settings shrunk to the tiny ones (the README's `pmod ablate` in the
    tests: one run for the session)."""
    return quick_ablation


def unit_results(out: Path) -> dict[tuple[str, int], dict]:
    return {(p.parent.parent.name, int(p.parent.name.removeprefix("seed"))): json.loads(p.read_text())
            for p in (out / "runs").glob("*/seed*/result.json")}  # fmt: skip


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_quick_report_numbers_are_the_units(run):
    """Every row's mean, sd and paired differences recomputed from the units' own result files."""
    out, report = run
    md = (out / "report.md").read_text()
    assert "smoke run" in md and report["table"] in md
    assert (out / "accuracy_vs_tflops.png").stat().st_size > 5000 and "](accuracy_vs_tflops.png)" in md
    units = unit_results(out)
    assert set(units) == {(v, s) for v in VARIANTS for s in (0, 1)}
    rows = report["rows"]
    assert list(rows) == list(VARIANTS)
    for name, row in rows.items():
        acc = np.array([units[(name, s)]["accuracy"] for s in (0, 1)])
        assert row["accuracy_mean"] == pytest.approx(acc.mean())
        assert row["accuracy_sd"] == pytest.approx(acc.std(ddof=1))
        dense = np.array([units[("dense", s)]["accuracy"] for s in (0, 1)])
        if name != "dense":
            diff = 100 * (acc - dense)
            got = row["vs_dense"]
            assert got["mean"] == pytest.approx(diff.mean(), abs=0.01)
            assert got["sd"] == pytest.approx(diff.std(ddof=1), abs=0.01)
            assert got["larger_than_spread"] == (abs(got["mean"]) > got["sd"] + 1e-9)
            sentence = next(line for line in md.splitlines() if line.startswith(f"- **{row['label']}**:"))
            if got["mean"] or got["sd"]:
                assert ("larger than the seed spread" in sentence) == got["larger_than_spread"]
        ratio = np.mean([units[(name, s)]["prefill_tflops"] / units[("dense", s)]["prefill_tflops"] for s in (0, 1)])
        assert row["tflops_ratio"] == pytest.approx(ratio)
        assert row["nonfinite_loss_steps"] == sum(units[(name, s)]["nonfinite_loss_steps"] for s in (0, 1))
        assert row["latency_ratio"] == pytest.approx(report["latency_ms"][name] / report["latency_ms"]["dense"])
    assert rows["fastv"]["train_seconds"] == 0  # training-free: evaluated on the trained dense model
    trained = [units[(v, 0)]["loss"] for v in VARIANTS if VARIANTS[v].trained]
    assert all(len(loss) >= 2 for loss in trained)


def test_report_names_the_model_it_trained(run):
    """The model sentence carries the run's decoder depth and width, and no text is left unformatted (a missing f
    once printed "({task.layers}-layer" into every report)."""
    out, _ = run
    md = (out / "report.md").read_text()
    task = tiny_settings().task
    assert (f"Model: the demo's small LLaVA ({task.layers}-layer Llama decoder of hidden size {task.hidden}; the "
            f"demo's decoder has {DemoSettings().layers} layers, fewer here") in md  # fmt: skip
    assert not re.findall(r"\{[A-Za-z_][\w.]*\}", md)


def test_training_free_rows_carry_their_configs(run):
    """The PyramidDrop and DART rows: in the saved settings, each unit's result and the report with the config
    their solver (or the paper) gives for the run's model and prompt, trained on nothing, and the Budgets section
    counts each layer's kept tokens with the method's own rounding (DART: round(16 * 0.222) = 4, not floor's 3)."""
    from pmod.io.model_folder import load_model

    out, report = run
    settings = json.loads((out / "ablate.json").read_text())
    assert {"fastv", "pdrop", "dart", "pdrop_paper", "dart_paper"} <= set(settings["variants"])
    model, _ = load_model(out / "runs" / "dense" / "seed0", "cpu")
    dims = LMDims.from_config(model.config)
    workload = Workload(dims, report["workload"]["n_vision"], report["workload"]["n_text"])
    assert (dims.layers, workload.n_vision) == (6, 16)
    want = {
        "pdrop": ("pdrop", pdrop_at_budget(workload, pmod.PModConfig()).to_dict()),
        "dart": ("dart", dart_at_budget(workload, pmod.PModConfig()).to_dict()),
        "pdrop_paper": ("pdrop", {"layers": [2, 3, 5], "keep": 0.5}),
        "dart_paper": ("dart", {"layer": 2, "keep": 0.222, "pivots": 4, "text_pivots": 4}),
    }
    units = unit_results(out)
    md = (out / "report.md").read_text()
    for name, (method, config) in want.items():
        row = report["rows"][name]
        assert (row["method"], row["config"]) == (method, config), name
        assert row["group"] == VARIANTS[name].group and row["train_seconds"] == 0
        assert all((units[(name, s)]["method"], units[(name, s)]["config"]) == (method, config) for s in (0, 1))
        assert f"| {VARIANTS[name].label} | " in report["table"]
    for name in ("pdrop", "dart"):  # held to p-MoD's TFLOPs: one token per routed layer of 16 is ~1-2% here
        assert report["rows"][name]["tflops_ratio"] == pytest.approx(report["rows"]["pmod"]["tflops_ratio"], rel=0.02)
    budget = next(line for line in md.splitlines() if line.startswith(f"- {VARIANTS['dart_paper'].label}:"))
    assert "vision tokens each keeps [4, 4, 4, 4] of 16" in budget, budget
    keep = want["pdrop"][1]["keep"]
    pdrop = next(line for line in md.splitlines() if line.startswith(f"- {VARIANTS['pdrop'].label}:"))
    kept = [math.floor(16 * keep**s) for s in (1, 2, 2, 3)]  # stage s from boundary s: layers 2 | 3, 4 | 5
    assert f"routed layers [2, 3, 4, 5], vision tokens each keeps {kept} of 16" in pdrop, pdrop
    assert f"lambda {keep:.4f} at stage boundaries [2, 3, 5]" in pdrop


def load_unit(out: Path, variant: str, seed: int) -> tuple[torch.nn.Module, object, pmod.MethodConfig | None]:
    """A unit's model as it was evaluated, and its config read back from its result file."""
    from pmod.io.model_folder import load_model

    result = json.loads((out / "runs" / variant / f"seed{seed}" / "result.json").read_text())
    config = None if result["config"] is None else method_class(result["method"]).from_dict(result["config"])
    if VARIANTS[variant].trained:
        model, processor = load_model(out / "runs" / variant / f"seed{seed}", "cpu")
    else:
        model, processor = load_model(out / "runs" / "dense" / f"seed{seed}", "cpu")
        if config is not None:  # None: a control on the dense model itself (blank images)
            pmod.convert(model, config)
    return model, processor, config


def processed_per_layer(model, processor, out: Path) -> tuple[list[int], int, int]:
    """Tokens each decoder layer processed for one test prompt (record_routing; unrecorded layers: all)."""
    from pmod.experiments.demo_runs import question_and_answer, record_image
    from pmod.io.model_folder import encode

    record = next(r for r in json.loads((out / "data" / "test.json").read_text()) if r.get("image"))
    inputs = encode(processor, model, [question_and_answer(record)[0]], [[record_image(out / "data", record)]])
    n = int(inputs["input_ids"].shape[1])
    n_vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    counts = [n] * model.config.text_config.num_hidden_layers
    method = pmod.get_method_config(model)
    if method is not None and not method.routes_layers:  # VisionZip: the sequence the decoder layers get is shorter
        from pmod.core.backbone import backbone_for

        layers = backbone_for(model).decoder_layers(model)
        hooks = [layer.register_forward_pre_hook(
            lambda m, a, k, i=i: counts.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1]),
            with_kwargs=True) for i, layer in enumerate(layers)]  # fmt: skip
        with torch.no_grad():
            model(**inputs)
        for hook in hooks:
            hook.remove()
    elif method is not None and pmod.layer_ratios(model) != [None] * len(counts):
        with torch.no_grad(), pmod.record_routing(model) as rec:
            model(**inputs)
        for layer, masks in rec.processed.items():
            counts[layer] = int(masks[0][0].sum())
    return counts, n_vision, n - n_vision


def test_task_check_rows(run, monkeypatch):
    """The task check: FastV and the random control keep a quarter of the vision tokens from layer 2 (the same
    counts), and the blank-image row asks the dense model about images of each record's background alone."""
    from PIL import Image

    from pmod.experiments import demo_runs
    from pmod.io.model_folder import load_model
    from pmod.recipes import generate

    out, report = run
    for name, ranking in (("check_fastv", "attention"), ("check_random", "random")):
        assert (report["rows"][name]["method"], report["rows"][name]["config"]) == (
            "fastv", {"layer": 2, "keep": 0.25, "ranking": ranking, "seed": 0})
    assert report["rows"]["check_blind"]["config"] is None
    units = unit_results(out)
    assert units[("check_random", 1)]["config"]["seed"] == 1  # each training seed its own draw
    model, processor = load_model(out / "runs" / "dense" / "seed0", "cpu")
    eval_samples = json.loads((out / "ablate.json").read_text())["task"]["eval_samples"]
    run_test = [r for r in json.loads((out / "data" / "test.json").read_text()) if r.get("image")][:eval_samples]
    blind = demo_runs.evaluate_model(model, processor, out / "data", run_test, blank_images=True)
    assert units[("check_blind", 0)]["per_question_kind"] == blind["per_question_kind"]  # the unit asked this way
    assert json.loads(units[("check_blind", 0)]["fingerprint"])["blank_images"] is True
    seen = []
    real_answer = generate.answer
    monkeypatch.setattr(generate, "answer", lambda m, p, q, images, **kw: seen.extend(images) or real_answer(
        m, p, q, images, **kw))  # fmt: skip
    test = [r for r in json.loads((out / "data" / "test.json").read_text()) if r.get("image")][:4]
    demo_runs.evaluate_model(model, processor, out / "data", test, blank_images=True)
    for record, (image,) in zip(test, seen):
        original = Image.open(out / "data" / record["image"])
        assert image.size == original.size and len(set(original.getdata())) > 1
        assert set(image.getdata()) == {tuple(record["meta"]["background"])}


def test_processed_tokens_equal_the_analytic_count(run):
    """For every variant's evaluated model, the tokens each layer processed equal the analytic count of its
    config; gamma-MoD also on layers chosen from a given ARank (the tiny models' ARank ties, so they route none)."""
    out, _ = run
    for variant in VARIANTS:
        model, processor, config = load_unit(out, variant, 0)
        counts, n_vision, n_text = processed_per_layer(model, processor, out)
        dims = LMDims.from_config(model.config)
        cost = estimate(dims, config or pmod.PModConfig(), n_vision=n_vision, n_text=n_text)
        want = [c.processed for c in (cost.routed_layers if config is not None else cost.dense_layers)]
        assert counts == want, variant
        if config is not None and variant != "gamma_mod":
            assert counts != [n_vision + n_text] * len(counts), variant  # it does route
    model, processor, _ = load_unit(out, "dense", 0)
    arank = [9.0, 3.0, 4.0, 8.0, 7.0, 6.0]  # the 4th largest is 6.0: layers 1 and 2 lie below it
    gamma = variant_configs(["gamma_mod"], Workload(dims, n_vision, n_text), arank=arank)["gamma_mod"]
    assert gamma.layers == [1, 2]
    pmod.convert(model, gamma)
    counts, _, _ = processed_per_layer(model, processor, out)
    cost = estimate(dims, gamma, n_vision=n_vision, n_text=n_text)
    assert counts == [c.processed for c in cost.routed_layers]
    assert counts[1] == n_text + n_vision // 2  # every prompt text token is a question token at inference


LLAVA_7B = LMDims(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
DEMO_12 = LMDims(hidden=128, layers=12, heads=4, kv_heads=4, head_dim=32, intermediate=256, vocab=64)


def flops_with_kept(config, workload: Workload, kept: int) -> int:
    """Analytic FLOPs of ``config`` with its ratio set so that a routed layer keeps ``kept`` vision tokens."""
    n = workload.n_vision
    if isinstance(config, pmod.MoDConfig):
        other = dataclasses.replace(config, ratio=(kept + 0.5) / n)  # floor(n * r) = kept
    else:
        other = dataclasses.replace(config, keep=kept / n)  # round(n * keep) = kept
    return estimate(workload.dims, other, n_vision=n, n_text=workload.n_text).routed_flops


@pytest.mark.parametrize("solver", [mod_at_budget, fastv_at_budget, dart_at_budget])
@pytest.mark.parametrize(
    "workload, tolerance",
    # LLaVA-1.5-7B (576 vision tokens): within 0.5%. The demo's 12-layer model (64 vision tokens): one token per
    # routed layer is ~1% of the cost, so the best point of the grid is what can be met.
    [(Workload(LLAVA_7B, 576, 64), 0.005), (Workload(DEMO_12, 64, 15), 0.01)],
)
def test_flops_matching_solver(solver, workload, tolerance):
    """The solved ratio gives p-MoD's TFLOPs within the tolerance, and no token count next to it comes closer."""
    target = estimate(workload.dims, pmod.PModConfig(), n_vision=workload.n_vision, n_text=workload.n_text).routed_flops
    config = solver(workload, pmod.PModConfig())
    if isinstance(config, pmod.MoDConfig):
        k = schedules.kept_count(workload.n_vision, config.ratio)
    else:
        k = schedules.kept_count(workload.n_vision, config.keep, "round")
    got = flops_with_kept(config, workload, k)
    assert got == estimate(workload.dims, config, n_vision=workload.n_vision, n_text=workload.n_text).routed_flops
    assert got == pytest.approx(target, rel=tolerance)
    assert abs(got - target) <= min(abs(flops_with_kept(config, workload, k + d) - target) for d in (-1, 1))


DEMO_8 = dataclasses.replace(DEMO_12, layers=8)


@pytest.mark.parametrize(
    "workload, tolerance, boundaries",
    # the same tolerances as the MoD / FastV / DART solvers; the ablation's own 8-layer model as well
    [(Workload(LLAVA_7B, 576, 64), 0.005, [8, 16, 24]), (Workload(DEMO_12, 64, 15), 0.01, [3, 6, 9]),
     (Workload(DEMO_8, 64, 15), 0.01, [2, 4, 6])],
)  # fmt: skip
def test_pdrop_solver_meets_pmod_tflops(workload, tolerance, boundaries):
    """PyramidDrop's solved lambda gives p-MoD's TFLOPs within the tolerance (both from
    pmod.analysis.analytic_flops), on stage boundaries at the paper's share of the depth, and no lambda of a fine grid
    comes closer."""
    n, n_text = workload.n_vision, workload.n_text
    target = estimate(workload.dims, pmod.PModConfig(), n_vision=n, n_text=n_text).routed_flops
    config = pdrop_at_budget(workload, pmod.PModConfig())
    assert config.layers == boundaries
    got = estimate(workload.dims, config, n_vision=n, n_text=n_text).routed_flops
    assert got == pytest.approx(target, rel=tolerance)
    # what the solver claims, recounted by hand: stage s keeps floor(n lambda^s) vision tokens in its layers
    kept = [math.floor(n * config.keep**s) for s in (1, 2, 3)]
    stage_of = np.searchsorted(boundaries, np.arange(workload.dims.layers), side="right")
    want = [n_text + (n if s == 0 else kept[s - 1]) for s in stage_of]
    assert [c.processed for c in estimate(workload.dims, config, n_vision=n, n_text=n_text).routed_layers] == want
    grid = np.linspace(0.05, 1.0, 1901)
    others = [estimate(workload.dims, dataclasses.replace(config, keep=float(k)), n_vision=n,
                       n_text=n_text).routed_flops for k in grid]  # fmt: skip
    assert abs(got - target) <= min(abs(f - target) for f in others)


def test_pdrop_boundaries_scale_the_papers_to_the_depth():
    """8, 16, 24 of 32 layers at the same share of the depth, rounded half up; coinciding ones merged."""
    assert [pdrop_boundaries(n) for n in (32, 16, 12, 8, 6, 4, 3, 2)] == [
        [8, 16, 24], [4, 8, 12], [3, 6, 9], [2, 4, 6], [2, 3, 5], [1, 2, 3], [1, 2], [1]]  # fmt: skip


def test_schedules_have_pmod_mean_retention():
    workload = Workload(LLAVA_7B, 576, 64)
    configs = variant_configs(["pmod", "constant", "linear", "tanh", "string"], workload)
    want = schedules.mean_retention(configs["pmod"].layer_ratios(32))
    assert want == pytest.approx(0.5375)
    for name in ("constant", "linear"):
        assert schedules.mean_retention(configs[name].layer_ratios(32)) == pytest.approx(want, abs=1e-6), name
    assert configs["linear"].schedule == "linear" and configs["constant"].schedule == "constant"
    # The ladder changes one thing per rung: STRing on top of TanhNorm 0.2, same ratios.
    assert dataclasses.replace(configs["tanh"], string=True) == configs["string"]


def test_same_config_and_seed_give_the_same_run(run, tmp_path):
    """A unit trained again (here, one at a time in this process; in the run, in a worker beside another) gives
    identical losses and accuracy; the other seed of the same variant does not. Asked again, it is read back."""
    from pmod.experiments.ablate_runs import Layout, Unit, run_units

    out, report = run
    for part in ("data", "seeds"):
        (tmp_path / part).symlink_to(out / part)
    first = json.loads((out / "runs" / "pmod" / "seed0" / "result.json").read_text())
    settings = AblateSettings.from_dict(report["settings"])
    test = [r for r in json.loads((out / "data" / "test.json").read_text()) if r.get("image")]
    test = test[: settings.task.eval_samples]
    unit = Unit("pmod", 0, pmod.PModConfig())
    results, failures = run_units([unit], Layout(tmp_path), settings.task, test, settings.threads, workers=1)
    again = results[unit.key]
    assert not failures
    assert [tuple(x) for x in again["loss"]] == [tuple(x) for x in first["loss"]]
    assert again["accuracy"] == first["accuracy"] and again["per_question_kind"] == first["per_question_kind"]
    other = json.loads((out / "runs" / "pmod" / "seed1" / "result.json").read_text())
    assert other["loss"] != first["loss"]
    written = (tmp_path / "runs" / "pmod" / "seed0" / "result.json").stat().st_mtime_ns
    read_back = run_units([unit], Layout(tmp_path), settings.task, test, settings.threads, workers=1)[0]
    assert read_back == json.loads(json.dumps(results))
    assert (tmp_path / "runs" / "pmod" / "seed0" / "result.json").stat().st_mtime_ns == written


def test_killed_run_resumes_to_the_same_report(run, tmp_path, capsys):
    """Kill a run (SIGKILL, its workers too) after its first unit is written; `--resume` finishes it, and its report
    rows and unit results equal the uninterrupted run's apart from measured times. (The killed run has three of the
    rows, a trained and a training-free one beside dense, to keep the test short; a row depends only on its own,
    dense's and p-MoD's units.)"""
    out, report = run
    folder = tmp_path / "killed"
    settings = dataclasses.replace(tiny_settings(), variants=("dense", "pmod", "fastv"))
    code = ("import json, sys; from pathlib import Path; "
            "from pmod.experiments.ablate import AblateSettings, run_ablation; "
            "run_ablation(Path(sys.argv[1]), AblateSettings.from_dict(json.loads(sys.argv[2])))")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), json.dumps(settings.to_dict())], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while not list((folder / "runs").glob("*/seed*/result.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list((folder / "runs").glob("*/seed*/result.json")))
    assert 1 <= finished < 6
    assert main(["ablate", "--resume", str(folder)]) == 0
    assert f"resuming: {finished} of 6 units already finished" in capsys.readouterr().out
    resumed = json.loads((folder / "report.json").read_text())
    assert resumed["resumed"] and not resumed["failures"]
    assert list(resumed["rows"]) == list(settings.variants)
    for name, row in resumed["rows"].items():
        assert without_timings(row) == without_timings(report["rows"][name]), name
    units, again = unit_results(out), unit_results(folder)
    assert set(again) == {(v, s) for v in settings.variants for s in (0, 1)}
    assert without_timings(again) == without_timings({k: units[k] for k in again})


def test_flag_mistakes(run, tmp_path, capsys):
    out, _ = run
    cases = [
        (["--resume", str(tmp_path)], "no pmod ablate run there"),
        (["--out", str(out)], "already holds a pmod ablate run"),
        (["--resume", str(out), "--steps", "7"], "--steps differs from the run"),
        (["--resume", str(out), "--budget-range", "0.5,0.9"], "--budget-range differs from the run"),
        (["--variants", "pmod,prd", "--out", str(tmp_path / "x")], "unknown variant(s) prd"),
        (["--seeds", "0", "--out", str(tmp_path / "x")], "--seeds is 0"),
    ]
    for argv, words in cases:
        assert main(["ablate", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (tmp_path / "x").exists()


def test_output_folder_mistakes(tmp_path, capsys, monkeypatch):
    """An existing file as --out, a folder another run is writing (a new run, and a --resume of it) get one line
    each before any work starts (the work is replaced by an error here, so that running on would show); once the
    other run is gone (its lock dies with it, as after a kill), --resume goes ahead."""
    from pmod.core.files import OutputLock
    from pmod.experiments import demo_runs

    def no_work(*args):
        raise RuntimeError("the run started working")

    monkeypatch.setattr(demo_runs, "make_data", no_work)
    (tmp_path / "file").write_text("x")
    assert main(["ablate", "--quick", "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an existing file, not a folder" in err and len(err.splitlines()) == 1
    busy = tmp_path / "busy"
    with OutputLock(busy, "pmod ablate"):
        assert main(["ablate", "--quick", "--out", str(busy)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by pmod ablate (pid {os.getpid()})" in err and len(err.splitlines()) == 1
        (busy / "ablate.json").write_text(json.dumps(tiny_settings().to_dict()))
        assert main(["ablate", "--resume", str(busy)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by pmod ablate (pid {os.getpid()})" in err and len(err.splitlines()) == 1
    with pytest.raises(RuntimeError, match="started working"):
        main(["ablate", "--resume", str(busy)])


def test_accuracy_plot_labels_apart_and_error_bars_within_0_1(tmp_path, monkeypatch):
    """The accuracy-vs-cost plot of rows whose points crowd together (a ladder at nearly equal cost) and lie near 0
    and 1 with a wide spread: every drawn error bar stays within [0, 1], and no two texts (labels, legend, title,
    axis labels) overlap on the saved figure."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from pmod.experiments.ablate_report import plot_accuracy_vs_cost

    points = {"dense": (1.0, 0.98, 0.05), "mod": (0.50, 0.50, 0.02), "tanh1": (0.505, 0.515, 0.02),
              "tanh": (0.51, 0.53, 0.02), "string": (0.502, 0.545, 0.03), "pmod": (0.50, 0.56, 0.01),
              "constant": (0.52, 0.565, None), "linear": (0.56, 0.02, 0.05), "gamma_mod": (0.8, 0.97, 0.08),
              "fastv": (0.503, 0.50, 0.0), "pdrop": (0.501, 0.52, 0.02), "dart": (0.506, 0.49, 0.03),
              "pdrop_paper": (0.47, 0.45, 0.05), "dart_paper": (0.42, 0.995, 0.04)}  # fmt: skip
    rows = {name: {"label": VARIANTS[name].label, "group": VARIANTS[name].group, "tflops_ratio": t,
                   "accuracy_mean": acc, "accuracy_sd": sd} for name, (t, acc, sd) in points.items()}  # fmt: skip
    saved = []
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    plot_accuracy_vs_cost(rows, tmp_path / "plot.png")
    (fig,) = saved
    (ax,) = fig.axes
    bars = [c for c in ax.containers if c.has_yerr]
    assert len(bars) == len(rows)
    for container in bars:
        ys = [y for collection in container[2] for segment in collection.get_segments() for _, y in segment]
        ys += [y for cap in container[1] for y in cap.get_ydata()]
        assert ys and min(ys) >= 0.0 and max(ys) <= 1.0, ys
    renderer = FigureCanvasAgg(fig).get_renderer()  # closed after saving: measured on a fresh canvas
    fig.draw(renderer)
    texts = [t for t in ax.texts if t.get_text()] + ax.get_legend().get_texts()
    texts += [ax.title, ax.xaxis.label, ax.yaxis.label]
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts]  # the text (not an arrow's)
    shown = {name for text, _ in boxes for name in text.split("\n")}
    assert {VARIANTS[n].label for n in rows} <= shown  # every row is labelled
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            overlap_w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            overlap_h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            assert overlap_w <= 0 or overlap_h <= 0, (a, b)


def test_a_stored_unit_is_reused_only_under_the_same_resolved_task(monkeypatch):
    """A unit's fingerprint names the task's kinds and tower as resolved, not "the default": the same settings
    spelled out match the defaults, and a change of the task's defaults makes the stored unit train again."""
    from pmod.experiments import demo
    from pmod.experiments.ablate_runs import Unit, fingerprint

    unit = Unit("dense", 0, None)
    default = fingerprint(unit, DemoSettings(task="scenes"))
    spelled = DemoSettings(task="scenes", question_kinds=("count", "half"), vision_patch_local=True)
    assert fingerprint(unit, spelled) == default
    monkeypatch.setitem(demo.TASK_DEFAULTS, "scenes", demo.TaskDefaults(kinds=("count",), patch_local=True))
    assert fingerprint(unit, DemoSettings(task="scenes")) != default
    monkeypatch.setitem(demo.TASK_DEFAULTS, "scenes", demo.TaskDefaults(kinds=("count", "half"), patch_local=False))
    assert fingerprint(unit, DemoSettings(task="scenes")) != default


def test_the_imageless_row_trains_on_blank_images(run, tmp_path):
    """``check_imageless`` trains the dense model on a copy of the data whose images are blank (each its record's
    background, as ``check_blind`` asks), made once and kept while the data is the same."""
    import shutil

    from PIL import Image

    from pmod.experiments.demo_runs import DATA_SETTINGS, make_blank_data

    out, report = run
    data, blank = out / "data", out / "data-blank"
    assert (blank / "train.json").read_bytes() == (data / "train.json").read_bytes()
    records = [r for r in json.loads((data / "train.json").read_text()) if r.get("image")]
    for record in records[:8]:
        original, image = (Image.open(folder / record["image"]) for folder in (data, blank))
        assert image.size == original.size and len(set(original.getdata())) > 1
        assert set(image.convert("RGB").getdata()) == {tuple(record["meta"]["background"])}
    units = unit_results(out)
    unit = units[("check_imageless", 0)]
    assert (unit["trained_on"], units[("dense", 0)]["trained_on"], units[("check_blind", 0)]["trained_on"]) == (
        "data-blank", "data", None)
    assert unit["train_seconds"] > 0 and report["rows"]["check_imageless"]["config"] is None
    assert unit["loss"] != units[("dense", 0)]["loss"]  # same seed, base and data order: only the images differ
    assert json.loads(unit["fingerprint"])["blank_images"] is True
    data, blank = shutil.copytree(data, tmp_path / "data"), shutil.copytree(blank, tmp_path / "data-blank")
    stamp = (blank / "train.json").stat().st_mtime_ns
    make_blank_data(data, blank)  # the same data: kept
    assert (blank / "train.json").stat().st_mtime_ns == stamp
    (data / DATA_SETTINGS).write_text(json.dumps({"another": "set"}))  # data made again: so is the blank copy
    make_blank_data(data, blank)
    assert (blank / DATA_SETTINGS).read_text() == (data / DATA_SETTINGS).read_text()
    assert (blank / "train.json").stat().st_mtime_ns != stamp
