"""`pmod eval` never reuses or shows a result under another model's name, keeps results of other limits, locks its
output folder, refuses an --out that is a file, and refuses models whose weights or scores are not finite."""

import json
import os
import shutil

import pytest

pytest.importorskip("lmms_eval")

import pmod  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.core.files import OutputLock  # noqa: E402
from pmod.data import synth  # noqa: E402
from pmod.testing import tiny_llava_folder  # noqa: E402

TASK = "pmod_shapes_mc"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two model folders with the same name (so the same label, numbered by order): a dense one and a p-MoD one,
    whose prefill TFLOPs differ; and a small shapes set."""
    root = tmp_path_factory.mktemp("eval-keys")
    dense = tiny_llava_folder(str(root / "a" / "model"))
    routed = tiny_llava_folder(str(root / "b" / "model"), method_config=pmod.PModConfig(), seed=1)
    data = root / "data"
    synth.generate(data, 60, seed=0, image_size=32, test_fraction=0.2)
    return root, dense, routed, data


def run_eval(setup, models, out, limit, capsys, task=TASK) -> tuple[int, str]:
    root, dense, routed, data = setup
    argv = ["eval", *(x for m in models for x in ("--model", m)), "--tasks", task, "--limit", str(limit),
            "--shapes-data", str(data), "--out", str(out), "--device", "cpu"]  # fmt: skip
    rc = main(argv)
    return rc, capsys.readouterr().err


def rows_by_folder(out) -> dict[str, dict]:
    report = json.loads((out / "report.json").read_text())
    return {report["models"][r["model"]]: r for r in report["tasks"][TASK]}


def test_models_in_another_order_keep_their_own_numbers(setup, tmp_path, capsys):
    root, dense, routed, data = setup
    out = tmp_path / "out"
    assert run_eval(setup, [dense, routed], out, 3, capsys)[0] == 0
    first = rows_by_folder(out)
    assert first[dense]["model"] == "model" and first[routed]["model"] == "model-2"
    assert first[routed]["prefill_tflops"] < first[dense]["prefill_tflops"]  # the two are told apart by this
    rc, log = run_eval(setup, [routed, dense], out, 3, capsys)
    second = rows_by_folder(out)
    assert rc == 0 and second[routed]["model"] == "model" and second[dense]["model"] == "model-2"
    for folder in (dense, routed):  # the label moved with the order, the numbers stayed with the folder
        assert second[folder]["prefill_tflops"] == first[folder]["prefill_tflops"]
    assert second[dense]["tflops_ratio"] == pytest.approx(1 / first[routed]["tflops_ratio"], rel=1e-12)
    assert "evaluating" not in log and log.count("reused") == 2, log  # and neither was measured again
    assert [second[f]["result"] for f in (dense, routed)] == [first[f]["result"] for f in (dense, routed)]
    # changed weights are another measurement: measured again, the other model reused
    weights = os.path.join(routed, "model.safetensors")
    stat = os.stat(weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rc, log = run_eval(setup, [routed, dense], out, 3, capsys)
    assert rc == 0 and f"model / {TASK}: evaluating" in log and f"model-2 / {TASK}: the same model" in log, log


def test_another_limit_keeps_the_earlier_result(setup, tmp_path, capsys):
    root, dense, routed, data = setup
    out = tmp_path / "out"
    assert run_eval(setup, [dense], out, 3, capsys)[0] == 0
    three = rows_by_folder(out)[dense]
    saved = {path: path.read_text() for path in out.rglob("result.json")}
    assert len(saved) == 1
    rc, log = run_eval(setup, [dense], out, 2, capsys)
    two = rows_by_folder(out)[dense]
    assert rc == 0 and "evaluating" in log and two["documents"] == 2 and three["documents"] == 3
    assert {path: path.read_text() for path in saved} == saved  # the limit-2 result lies beside it, not over it
    assert len(list(out.rglob("result.json"))) == 2
    rc, log = run_eval(setup, [dense], out, 3, capsys)
    assert rc == 0 and "evaluating" not in log and rows_by_folder(out)[dense] == three


def test_second_writer_of_an_out_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    with OutputLock(out, "pmod eval"):  # another run holds it (flock: a second open file conflicts in-process too)
        rc, err = run_eval(setup, [setup[1]], out, 2, capsys)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last == (f"pmod eval: error: --out {out} is in use by pmod eval (pid {os.getpid()}); wait for "
                                f"it to finish or pass another --out."), err[-2000:]  # fmt: skip
    assert not (out / "report.json").exists()


def test_out_that_is_a_file_gives_one_line(setup, tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    rc, err = run_eval(setup, [setup[1]], target, 2, capsys)
    assert rc == 2 and err.strip().splitlines() == [
        f"pmod eval: error: --out {target} is an existing file, not a folder; pass a folder path."]  # fmt: skip
    assert target.read_text() == "keep me"


def edited_copy(folder, to, edit) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, to)
    weights = load_file(os.path.join(to, "model.safetensors"))
    edit(weights)
    save_file(weights, os.path.join(to, "model.safetensors"), metadata={"format": "pt"})
    return str(to)


def test_diverged_weights_are_refused_by_name(setup, tmp_path, capsys):
    import torch

    dense = setup[1]

    def nan(w):
        w[next(k for k in w if k.endswith("layers.1.mlp.up_proj.weight"))][0, 0] = float("nan")

    def huge(w):  # what a learning rate of 1e30 leaves after one step: every weight ~3e30, all finite
        g = torch.Generator().manual_seed(0)
        for k, v in w.items():
            if v.is_floating_point():
                w[k] = v + 3e30 * torch.randn(v.shape, generator=g).sign()

    for name, edit, message in (
        ("nan", nan, "has non-finite weights (1 tensors, e.g. model.language_model.layers.1.mlp.up_proj.weight); "
                     "it was saved from a diverged run (loss NaN or inf); evaluate an earlier checkpoint"),
        ("huge", huge, "has weights of magnitude 3e+30 ("),
    ):  # fmt: skip
        folder = edited_copy(dense, tmp_path / name, edit)
        rc, err = run_eval(setup, [folder], tmp_path / f"out-{name}", 2, capsys)
        last = err.strip().splitlines()[-1]
        assert rc == 2 and last.startswith(f"pmod eval: error: {folder} ") and message in last, err[-2000:]


@pytest.mark.parametrize("task", ["pmod_shapes_mc", "pmod_shapes"])
def test_non_finite_scores_are_refused(setup, tmp_path, monkeypatch, task):
    """A forward that gives NaN (here one NaN in the LM head: every log-likelihood and every logit row NaN) is an
    error naming the folder and the task, not a chance-level score."""
    import torch
    from lmms_eval.evaluator import simple_evaluate

    from pmod.core.errors import UserError
    from pmod.eval.lmms_model import RoutedLMM
    from pmod.eval.runner import task_manager

    root, dense, routed, data = setup
    monkeypatch.setenv("PMOD_SHAPES_DIR", str(data))
    lm = RoutedLMM(pretrained=dense, device="cpu", batch_size=2, cost_dir=tmp_path / "costs")
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] = float("nan")
    what = "log-likelihoods" if task.endswith("_mc") else "logits"
    with pytest.raises(UserError, match=rf"^{dense} gives non-finite {what} \(NaN or inf\) for 2 of 2 requests of "
                                        rf"task {task} \(1 of its weight tensors are non-finite\); it was likely saved "
                                        rf"from a diverged run: evaluate an earlier checkpoint"):  # fmt: skip
        simple_evaluate(model=lm, tasks=[task], limit=2, task_manager=task_manager([], [task]), verbosity="WARNING")
