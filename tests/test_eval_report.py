"""`pmod eval` on tiny dense and p-MoD folders with the local shapes task: the report's ratios against `pmod flops`,
its scores against the answers, the bootstrap interval, resuming, and one-line errors."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip("lmms_eval")

import pmod  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.data import synth  # noqa: E402
from pmod.eval.report import paired_bootstrap  # noqa: E402
from pmod.testing import tiny_llava_folder  # noqa: E402

LIMIT = 8


def eval_args(setup, tasks: str) -> list[str]:
    root, dense, routed, data = setup
    return ["eval", "--model", dense, "--model", routed, "--tasks", tasks, "--limit", str(LIMIT), "--batch-size", "4",
            "--shapes-data", str(data), "--out", str(root / "out"), "--device", "cpu"]  # fmt: skip


def evaluate(setup, tasks, capsys) -> str:
    rc = main(eval_args(setup, tasks))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return captured.err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmod-eval")
    dense = tiny_llava_folder(str(root / "dense"))
    routed = tiny_llava_folder(str(root / "pmod"), method_config=pmod.PModConfig())
    data = root / "data"
    synth.generate(data, 200, seed=1, image_size=32, test_fraction=0.2)
    # Every other target := the dense model's first answer word, so that scores are neither 0 nor equal.
    records = json.loads((data / "test.json").read_text())
    image = [r for r in records if r.get("image")][:LIMIT]
    batch = root / "questions.jsonl"
    for r in image:
        r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>", "").strip()
    batch.write_text("\n".join(json.dumps({"image": str(data / r["image"]), "prompt": r["conversations"][0]["value"]})
                               for r in image))  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["generate", "--model", dense, "--batch-file", str(batch), "--batch-size", "8", "--max-new-tokens",
                     "8", "--device", "cpu"]) == 0  # fmt: skip
    for i, (r, line) in enumerate(zip(image, out.getvalue().splitlines())):
        words = json.loads(line)["answer"].split()
        if i % 2 == 0 and words:
            r["conversations"][1]["value"] = words[0]
    (data / "test.json").write_text(json.dumps(records))
    return root, dense, routed, data


@pytest.fixture(scope="module")
def first_run(setup):
    """pmod eval of both models on pmod_shapes (capsys is per test: this captures by hand)."""
    assert main(eval_args(setup, "pmod_shapes")) == 0
    return json.loads((setup[0] / "out" / "report.json").read_text())


def flops_json(folder, n_vision, n_text, capsys) -> dict:
    assert main(["flops", folder, "--vision-tokens", str(n_vision), "--text-tokens", str(n_text), "--dtype",
                 "float32", "--json"]) == 0  # fmt: skip
    return json.loads(capsys.readouterr().out)


def test_report_ratios_equal_pmod_flops_for_the_same_tokens(setup, first_run, capsys):
    root, dense, routed, data = setup
    ref, row = first_run["tasks"]["pmod_shapes"]
    assert (ref["model"], row["model"]) == ("dense", "pmod")
    lines = {r["model"]: [json.loads(x) for x in (root / "out" / r["result"] / "costs" / "requests.rank0.jsonl")
                          .read_text().splitlines()] for r in (ref, row)}  # fmt: skip
    counts = {label: sorted((c["doc_id"], c["n_vision"], c["n_text"]) for c in lines[label]) for label in lines}
    assert counts["dense"] == counts["pmod"] and len(counts["dense"]) == LIMIT
    assert len({c[2] for c in counts["dense"]}) > 1  # questions of several lengths: a sum, not one ratio
    flops, kv = {"dense": 0, "pmod": 0}, {"dense": 0, "pmod": 0}
    for _, n_vision, n_text in counts["dense"]:
        d, p = flops_json(dense, n_vision, n_text, capsys), flops_json(routed, n_vision, n_text, capsys)
        flops["dense"] += d["dense_flops"]
        flops["pmod"] += p["pmod_flops"]
        kv["dense"] += d["dense_kv_bytes"]
        kv["pmod"] += p["pmod_kv_bytes"]
    assert row["tflops_ratio"] == pytest.approx(flops["pmod"] / flops["dense"], rel=1e-12)
    assert row["kv_ratio"] == pytest.approx(kv["pmod"] / kv["dense"], rel=1e-12)  # measured on the caches
    assert ref["prefill_tflops"] == pytest.approx(flops["dense"] / 1e12, rel=1e-12)
    assert row["kv_ratio"] < 1


def test_report_scores_are_the_first_answer_word_matches(setup, first_run):
    root, scores = setup[0], {}
    for row in first_run["tasks"]["pmod_shapes"]:
        samples = [json.loads(x) for x in (root / "out" / row["result"] / "samples.jsonl").read_text()
                   .splitlines()]  # fmt: skip
        by_hand = [s["filtered_resps"][0].split()[:1] == [s["target"]] for s in samples]
        assert len(samples) == LIMIT and row["score"] == pytest.approx(sum(by_hand) / LIMIT)
        scores[row["model"]] = row["score"]
    assert scores["dense"] >= 0.5
    row = first_run["tasks"]["pmod_shapes"][1]
    assert row["delta"] == pytest.approx(scores["pmod"] - scores["dense"])
    assert row["ci_low"] <= row["delta"] <= row["ci_high"] and row["paired_documents"] == LIMIT


def test_resume_reuses_finished_measurements(setup, first_run, capsys):
    root = setup[0]
    folders = {r["model"]: root / "out" / r["result"] for r in first_run["tasks"]["pmod_shapes"]}
    assert [p.parent.name for p in folders.values()] == ["pmod_shapes", "pmod_shapes"]
    finished = folders["dense"] / "result.json"
    before = (finished.read_bytes(), finished.stat().st_mtime_ns)
    dead = folders["pmod"]  # what a run killed mid-task leaves: no result.json
    (dead / "result.json").unlink()
    (dead / "samples.jsonl").write_text("partial")
    log = evaluate(setup, "pmod_shapes,pmod_shapes_mc", capsys)
    assert "dense / pmod_shapes: the same model, settings, task and limit finished in an earlier run" in log
    assert (finished.read_bytes(), finished.stat().st_mtime_ns) == before
    for m, task in (("pmod", "pmod_shapes"), ("dense", "pmod_shapes_mc"), ("pmod", "pmod_shapes_mc")):
        assert f"{m} / {task}: evaluating" in log
    assert (dead / "result.json").is_file() and (dead / "samples.jsonl").read_text() != "partial"
    report = json.loads((root / "out" / "report.json").read_text())
    assert [len(report["tasks"][t]) for t in ("pmod_shapes", "pmod_shapes_mc")] == [2, 2]
    again = evaluate(setup, "pmod_shapes,pmod_shapes_mc", capsys)
    assert "evaluating" not in again and again.count("reused") == 4
    assert not list((root / "out").glob(".costs-scratch*"))  # each run's scratch goes with it


def test_paired_bootstrap_interval_matches_the_normal_one():
    rng = np.random.default_rng(3)
    reference = rng.random(400) < 0.7
    scores = np.where(rng.random(400) < 0.15, ~reference, reference)  # flips 15% of the answers
    a, b = scores.astype(float).tolist(), reference.astype(float).tolist()
    delta, low, high = paired_bootstrap(a, b, samples=4000)
    diff = np.array(a) - np.array(b)
    half = 1.96 * diff.std(ddof=1) / math.sqrt(len(diff))
    assert delta == pytest.approx(diff.mean(), abs=1e-12)
    assert low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    # a task's own aggregation (here the mean written out) resamples the same documents
    loop = paired_bootstrap(a, b, aggregate=lambda v: math.fsum(v) / len(v), samples=4000)
    assert loop == pytest.approx((delta, low, high), abs=1e-12)


def test_bad_input_gives_one_line(setup, tmp_path, capsys):
    root, dense, routed, data = setup
    broken = tmp_path / "broken"
    shutil.copytree(dense, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    shapes = ["--shapes-data", str(data)]
    cases = [
        (["--model", dense, "--tasks", "pmod_shape", *shapes], "unknown task 'pmod_shape'; did you mean pmod_shapes"),
        (["--model", str(broken), "--tasks", "pmod_shapes", *shapes], f"{broken}/model.safetensors is truncated"),
        (["--model", str(tmp_path), "--tasks", "pmod_shapes", *shapes], "has no config.json"),
        (["--model", f"{dense},method=fastv,fastv_kep=0.2", "--tasks", "pmod_shapes"], "unknown model args fastv_kep"),
        (["--model", dense, "--tasks", "pmod_shapes", "--shapes-data", str(tmp_path)], "has no test.json"),
    ]
    for args, message in cases:
        rc = main(["eval", *args, "--out", str(tmp_path / "out")])
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith("pmod eval: error:") and message in last, last


def test_hub_task_offline_names_the_problem(tmp_path, capsys, monkeypatch):
    (tmp_path / "hub.yaml").write_text(
        "task: hub_only\ndataset_path: pmod-nonexistent-org/no-such-set\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tiny_llava_folder(str(tmp_path / "m"))
    rc = main(["eval", "--model", folder, "--tasks", "hub_only", "--include-path", str(tmp_path), "--out",
               str(tmp_path / "out")])  # fmt: skip
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "task hub_only needs a hub dataset" in last and "HF_HUB_OFFLINE" in last, last


def test_help_and_flag_errors_load_neither_torch_nor_lmms_eval():
    import subprocess
    import sys

    code = (
        "import sys\nfrom pmod.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    rc = e.code\nprint(sorted(m for m in ('torch', 'transformers', 'lmms_eval') if m in sys.modules), rc)\n"
    )
    for argv, rc in ((["eval", "--help"], 0), (["eval", "--model", "m"], 2)):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip().splitlines()[-1] == f"[] {rc}", proc.stderr[-500:]


def test_pdrop_and_dart_on_the_fly_with_their_cost(setup, tmp_path):
    """A dense folder evaluated with PyramidDrop (its list setting in brackets) and DART on the fly, as FastV: each
    row's TFLOPs and KV ratios equal pmod.analysis.analytic_flops' for the same requests' tokens (the KV measured on the
    caches), below dense, and report.md lists each model's method settings and cost."""
    from transformers import AutoConfig

    from pmod.analysis.analytic_flops import estimate
    from pmod.analysis.dims import LMDims

    root, dense, routed, data = setup
    configs = {"dense+pdrop": pmod.PDropConfig(layers=[1, 3], keep=0.5), "dense+dart": pmod.DARTConfig(keep=0.25)}
    models = [dense, f"{dense},method=pdrop,pdrop_layers=[1,3],pdrop_keep=0.5", f"{dense},method=dart,dart_keep=0.25"]
    out = tmp_path / "out"
    flags = [a for m in models for a in ("--model", m)]
    assert main(["eval", *flags, "--tasks", "pmod_shapes", "--limit", str(LIMIT), "--batch-size", "4",
                 "--shapes-data", str(data), "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    rows = {r["model"]: r for r in json.loads((out / "report.json").read_text())["tasks"]["pmod_shapes"]}
    assert list(rows) == ["dense", *configs]
    dims = LMDims.from_config(AutoConfig.from_pretrained(dense))
    md = (out / "report.md").read_text()
    for label, config in configs.items():
        lines = [json.loads(x) for x in (out / rows[label]["result"] / "costs" / "requests.rank0.jsonl").read_text()
                 .splitlines()]  # fmt: skip
        assert len(lines) == LIMIT
        costs = [estimate(dims, config, n_vision=c["n_vision"], n_text=c["n_text"], dtype="float32") for c in lines]
        flops = sum(c.routed_flops for c in costs) / sum(c.dense_flops for c in costs)
        kv = sum(c.routed_kv_bytes for c in costs) / sum(c.dense_kv_bytes for c in costs)
        assert rows[label]["tflops_ratio"] == pytest.approx(flops, rel=1e-12), label
        assert rows[label]["kv_ratio"] == pytest.approx(kv, rel=1e-12), label
        assert rows[label]["tflops_ratio"] < 1 and rows[label]["kv_ratio"] < 1
        assert f"| {label} | {rows[label]['score']:.4f} | " in md and f"| {rows[label]['tflops_ratio']:.1%} |" in md
    assert "- dense+pdrop: " in md and "(method=pdrop, pdrop_layers=[1,3], pdrop_keep=0.5)" in md
