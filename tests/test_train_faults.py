"""`pmod train` under faults: a second run into a locked folder, an output folder it cannot write, a diverged run, a
`null` record, a kill during the final save, broken checkpoints. Each case answers in one line or gives the result
of a run that was never disturbed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_argv
from transformers import PreTrainedModel, TrainerCallback

from pmod.core.errors import UserError
from pmod.core.files import INCOMPLETE_NAME, OutputLock
from pmod.core.weight_files import MAX_WEIGHT, unusable_weights
from pmod.recipes.train import TrainError, parse_args
from pmod.recipes.train_output import INCOMPLETE_ADVICE, resume_point
from pmod.recipes.training import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


class _Began(TrainerCallback):
    def __init__(self) -> None:
        self.began = False

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        self.began = True


# ---------------------------------------------------------------------------------------- case 2: one writer
def test_a_second_run_into_a_busy_output_dir_gets_one_line(train_setup: dict[str, str], tmp_path: Path) -> None:
    """While another run holds --output-dir, `pmod train` stops at once with one line naming the holder (exit 2);
    once the holder is killed (-9), the folder is free again."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pmod.core.files import OutputLock; "
         f"OutputLock({str(out)!r}, 'pmod train').__enter__(); print('held', flush=True); time.sleep(120)"],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        cli = [sys.executable, "-m", "pmod", "train", *train_argv(train_setup, out, "--max-steps", "1")]
        proc = subprocess.run(cli, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            f"pmod train: error: --output-dir {out} is in use by pmod train (pid {holder.pid}); wait for it to "
            f"finish or pass another --output-dir."
        )
        assert sorted(p.name for p in out.iterdir()) == [".pmod.lock"]  # nothing of the second run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    trainer = train(parse_args(train_argv(train_setup, out, "--max-steps", "1")))  # the kernel released the lock
    assert trainer.state.global_step == 1 and (out / "model.safetensors").is_file()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU (gloo) is tested on Linux")
def test_torchrun_into_a_busy_output_dir_stops_every_rank(train_setup: dict[str, str], tmp_path: Path) -> None:
    """Under torchrun only rank 0 takes the lock, and every rank learns its answer: all stop with the same line at
    once, none waits in a collective for a rank that is gone, none trains."""
    import socket

    out = tmp_path / "out"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    with OutputLock(out, "pmod train"):
        proc = subprocess.run(
            [*torchrun, "-m", "pmod.recipes.train", *train_argv(train_setup, out, "--max-steps", "1")],
            env={**ENV, "TOKENIZERS_PARALLELISM": "false"}, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    line = (
        f"pmod train: error: --output-dir {out} is in use by pmod train (pid {os.getpid()}); wait for it to finish "
        f"or pass another --output-dir."
    )
    assert proc.returncode != 0
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    assert not out.exists()  # nothing written: the folder the lock created is gone with it


# ------------------------------------------------------------------------------ case 3: a folder it cannot write
def test_an_output_dir_it_cannot_write_is_refused_before_training(train_setup: dict[str, str], tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, problem in (
        (afile, f"--output-dir {afile} is an existing file, not a folder; pass a folder path."),
        (afile / "out", f"--output-dir {afile / 'out'} cannot be written (Not a directory); pass a folder you can "
                        f"write to."),
    ):  # fmt: skip
        began = _Began()
        with pytest.raises(TrainError) as err:
            train(parse_args(train_argv(train_setup, out, "--max-steps", "1")), callbacks=[began])
        assert str(err.value) == problem
        assert not began.began  # refused before the first step, not after the last


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_dir_is_refused_before_training(train_setup: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    with pytest.raises(TrainError, match=r"cannot be written \(Permission denied\)"):
        train(parse_args(train_argv(train_setup, out, "--max-steps", "1")))


# ------------------------------------------------------------------------------------ case 4: a diverged run
class _DivergeAt(TrainerCallback):
    """From step ``step`` on, the learning rate is 1e30 (the scheduler's base too), and every log is kept."""

    def __init__(self, step: int) -> None:
        self.step, self.logs = step, []

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
            lr_scheduler.base_lrs = [1e30 for _ in lr_scheduler.base_lrs]

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
        self.logs.append(dict(logs))


def test_unusable_weights_name_nan_and_overflow() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert unusable_weights(model) == []
    with torch.no_grad():
        model[1].bias[0] = 3e30
        model[1].weight[0, 0] = 1e19  # large, but its square still fits in float32
    assert unusable_weights(model) == [("1.bias", pytest.approx(3e30))]
    with torch.no_grad():
        model[0].weight[1, 1] = math.nan
    (name, peak), second = unusable_weights(model)
    assert name == "0.weight" and math.isnan(peak) and second[0] == "1.bias"
    assert MAX_WEIGHT == pytest.approx(1.8446744e19)  # sqrt(float32 max = 3.4028e38)


def test_a_diverged_run_saves_nothing_and_says_so(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr 1e30 from step 3 on: step 3 updates every weight to ~1e30 (finite), step 4's loss is non-finite and
    skipped. The checkpoint of step 4 is refused in one line naming the step, the weight and checkpoint-2, which
    stays as it was; the skipped step logs its loss as it was (not 0)."""
    out = tmp_path / "out"
    flags = ("--max-steps", "6", "--save-strategy", "steps", "--save-steps", "2", "--lr-scheduler-type", "constant")
    diverge = _DivergeAt(2)
    with pytest.raises(TrainError) as err:
        train(parse_args(train_argv(train_setup, out, *flags)), callbacks=[diverge])
    assert str(err.value).startswith(
        "not saving checkpoint-4 at step 4: its weights are unusable (model.multi_modal_projector.linear_1.weight is "
    )
    assert str(err.value).endswith(
        f"in magnitude (beyond 1.8e+19)); 1 of 4 batches had a non-finite loss and were skipped. The training "
        f"diverged: the last saved checkpoint, {out / 'checkpoint-2'}, is intact; lower --learning-rate (now 0.001) "
        f"or set --max-grad-norm and train again"
    )
    assert _checkpoints(out) == ["checkpoint-2"] and not (out / "model.safetensors").exists()
    assert not [p for p in out.iterdir() if p.name.startswith("tmp-")]
    assert all(
        torch.isfinite(t).all() and t.abs().max() < 100
        for t in load_file(out / "checkpoint-2" / "model.safetensors").values()
    )
    losses = [log["loss"] for log in diverge.logs if "loss" in log]
    assert len(losses) == 4 and all(math.isfinite(x) and x > 0 for x in losses[:3]) and not math.isfinite(losses[3])
    assert resume_point(parse_args(train_argv(train_setup, out, "--resume-from-checkpoint", "auto")).trainer) == str(
        out / "checkpoint-2"
    )
    # Logged every 2 steps, the window of steps 3-4 logs step 3's loss (the mean of its finite batches), not half
    # of it (the skipped batch's zero averaged in).
    diverge2 = _DivergeAt(2)
    with pytest.raises(TrainError, match="^not saving checkpoint-4 at step 4"):
        argv = train_argv(train_setup, tmp_path / "out2", *flags, "--logging-steps", "2")
        train(parse_args(argv), callbacks=[diverge2])
    pairs = [log["loss"] for log in diverge2.logs if "loss" in log]
    assert pairs == pytest.approx([(losses[0] + losses[1]) / 2, losses[2]], rel=1e-4)


def test_a_mostly_skipped_run_warns_and_keeps_no_final_model(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """lr 1e30 from the first step, as reported: every step after the first is skipped. The run says so loudly,
    logs those losses as non-finite, and refuses to save the final model."""
    out = tmp_path / "out"
    log = _DivergeAt(-1)
    with pytest.raises(
        TrainError,
        match=r"^not saving the final model at step 4: its weights are unusable .* 3 of 4 "
        r"batches had a non-finite loss .* no checkpoint was saved before;",
    ):
        train(parse_args(train_argv(train_setup, out, "--max-steps", "4", "--learning-rate", "1e30")), callbacks=[log])
    err = capsys.readouterr().err
    assert ("pmod train: warning: 3 of 4 batches had a non-finite loss and were skipped: most of this run's updates "
            "were skipped, so the model barely trained; lower --learning-rate (now 1e+30) or set --max-grad-norm\n"
            ) in err  # fmt: skip
    losses = [entry["loss"] for entry in log.logs if "loss" in entry]
    assert math.isfinite(losses[0]) and not any(math.isfinite(x) for x in losses[1:]) and 0.0 not in losses
    assert log.logs[-1]["pmod/nonfinite_loss_steps"] == 3 and log.logs[-1]["pmod/batches"] == 4
    assert not out.exists()  # nothing written: the folder the lock created is gone with it


# ------------------------------------------------------------------------------------- case 5: a null record
def test_a_null_record_never_stops_training(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `null` among image records (the default --on-bad-sample skip): skipped and stood in for, for the whole
    epoch, with and without modality grouping."""
    records = json.loads(Path(train_setup["data"]).read_text())[:8] + [None]
    data = Path(train_setup["data"]).with_name("with_null.json")
    data.write_text(json.dumps(records))
    for extra in ((), ("--group-by-modality-length",)):
        argv = train_argv(train_setup, tmp_path / f"out{len(extra)}", "--num-train-epochs", "1", *extra)
        argv[argv.index("--data-path") + 1] = str(data)
        trainer = train(parse_args(argv))
        assert trainer.state.global_step == 3  # 9 records, batches of 4
        assert "pmod train: data: 9 records: 1 bad (skipped)" in capsys.readouterr().err


# -------------------------------------------------------------------------- case 8: a kill during the final save
class _Killed(BaseException):
    """Stands for a kill: no `except Exception` catches it."""


def test_a_kill_during_the_final_save_leaves_no_half_model(
    train_setup: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed while writing the final model's weights (its config.json already written), then while renaming the
    final files into place: neither leaves a folder that looks like a model without saying so, and resuming saves
    the final model from the last checkpoint without training a step more (no extra checkpoint)."""
    import pmod
    from pmod.io.model_folder import check_model_folder

    out = tmp_path / "out"
    flags = ("--max-steps", "4", "--save-strategy", "steps", "--save-steps", "2")
    save = PreTrainedModel.save_pretrained

    def killed_while_writing(self, save_directory, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "checkpoint-" in str(save_directory):
            return save(self, save_directory, *args, **kwargs)
        self.config.save_pretrained(save_directory)  # what save_pretrained writes first
        raise _Killed

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", killed_while_writing)
        with pytest.raises(_Killed):
            train(parse_args(train_argv(train_setup, out, *flags)))
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "config.json").exists()  # the half-written model is in staging, not at the top
    with pytest.raises(UserError, match="has no config.json"):
        check_model_folder(out, "pmod generate")

    import pmod.recipes.train_output as train_output

    replace, calls = os.replace, []

    def killed_while_swapping(src, dst):  # noqa: ANN001, ANN202
        calls.append(dst)
        if Path(src).parent.name == "tmp-final" and len(calls) == 3:
            raise _Killed
        return replace(src, dst)

    resume = (*flags, "--resume-from-checkpoint", "auto")
    with monkeypatch.context() as patch:
        patch.setattr(train_output.os, "replace", killed_while_swapping)
        with pytest.raises(_Killed):
            train(parse_args(train_argv(train_setup, out, *resume)))
    incomplete = f"{out} holds an incomplete model: its save was interrupted ({INCOMPLETE_NAME}). {INCOMPLETE_ADVICE}"
    for load in (lambda: check_model_folder(out, "pmod generate"), lambda: pmod.load(out)):
        with pytest.raises(UserError) as err:
            load()
        assert str(err.value) == incomplete

    trainer = train(parse_args(train_argv(train_setup, out, *resume)))
    assert trainer.state.global_step == 4
    assert _checkpoints(out) == ["checkpoint-2", "checkpoint-4"]  # no spurious checkpoint-5
    assert not (out / INCOMPLETE_NAME).exists() and not (out / "tmp-final").exists()
    check_model_folder(out, "pmod generate")
    final, last = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert pmod.is_routed_model(pmod.load(out))


# ------------------------------------------------------------------------------------ weak: broken checkpoints
def test_broken_checkpoints_fall_back_or_answer_in_one_line(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated model.safetensors or a missing optimizer.pt in the last checkpoint: `auto` resumes from the one
    before and says so (and ends with the weights of the undisturbed run); a named broken checkpoint, or only broken
    ones, is refused in one line."""
    flags = ("--max-steps", "4", "--save-strategy", "steps", "--save-steps", "2", "--group-by-modality-length")
    straight = tmp_path / "straight"
    train(parse_args(train_argv(train_setup, straight, *flags)))
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    weights = out / "checkpoint-4" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)

    def targs(resume: str):  # noqa: ANN202
        return parse_args(train_argv(train_setup, out, *flags, "--resume-from-checkpoint", resume)).trainer

    with pytest.raises(TrainError, match=(
        rf"^--resume-from-checkpoint {out / 'checkpoint-4'} cannot be resumed: model.safetensors is corrupt \(.*"
        rf"\); pass an earlier checkpoint-N or auto \(the newest complete one\)$"
    )):  # fmt: skip
        resume_point(targs(str(out / "checkpoint-4")))
    capsys.readouterr()
    resumed = train(parse_args(train_argv(train_setup, out, *flags, "--resume-from-checkpoint", "auto")))
    err = capsys.readouterr().err
    assert "pmod train: checkpoint-4 cannot be resumed (model.safetensors is corrupt (" in err
    assert "); resuming from checkpoint-2, the newest complete checkpoint, instead\n" in err
    assert resumed.state.global_step == 4
    a, b = load_file(straight / "model.safetensors"), load_file(out / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    load_file(out / "checkpoint-4" / "model.safetensors")  # saved again, whole

    (out / "checkpoint-4" / "optimizer.pt").unlink()
    with pytest.raises(TrainError, match=(
        rf"^--resume-from-checkpoint {out / 'checkpoint-4'} cannot be resumed: optimizer.pt is missing, so resuming "
        rf"would silently restart the optimizer; pass an earlier"
    )):  # fmt: skip
        resume_point(targs(str(out / "checkpoint-4")))
    assert resume_point(targs("auto")) == str(out / "checkpoint-2")
    assert "pmod train: checkpoint-4 cannot be resumed (optimizer.pt is missing" in capsys.readouterr().err
    (out / "checkpoint-2" / "scheduler.pt").write_bytes(b"trunc")
    with pytest.raises(TrainError, match=(
        rf"^no checkpoint in {out} can be resumed \(checkpoint-4: optimizer.pt is missing, .*; checkpoint-2: "
        rf"scheduler.pt is corrupt \(truncated\?\)\); remove the broken checkpoint-N folders to start from scratch$"
    )):  # fmt: skip
        resume_point(targs("auto"))
