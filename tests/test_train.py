"""Training recipe: stage-1 freezing, stage-2 learning, resume parity, recipes, atomic checkpoints, torchrun."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from pmod.data import synth
from pmod.recipes.train import TrainConfig, TrainError, parse_args
from pmod.recipes.trainer_fields import installed_name
from pmod.recipes.training import train

ROOT = Path(__file__).resolve().parents[1]


def train_argv(train_setup: dict[str, str], out: Path, *extra: str) -> list[str]:
    """`pmod train` flags for a short CPU run of the tiny model on its data into ``out``."""
    return [
        "--model", train_setup["model"], "--data-path", train_setup["data"], "--output-dir", str(out),
        "--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1",
        "--report-to", "none", "--use-cpu", "--max-length", "256", "--save-strategy", "no",
        "--disable-tqdm", "true", *extra,
    ]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_stage1_trains_only_projector(train_setup: dict[str, str], tmp_path: Path) -> None:
    train(parse_args(train_argv(train_setup, tmp_path, "--stage", "pretrain", "--max-steps", "2")))
    before, after = _weights(Path(train_setup["model"])), _weights(tmp_path)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert all(torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" not in k)
    assert {"pmod", "pmod_method"}.isdisjoint(json.loads((tmp_path / "config.json").read_text()))


def test_stage2_reduces_loss_and_logs_routing(train_setup: dict[str, str], tmp_path: Path) -> None:
    trainer = train(
        parse_args(
            train_argv(
                train_setup, tmp_path, "--max-steps", "16", "--learning-rate", "3e-3", "--group-by-modality-length"
            )
        )
    )
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 16
    first, last = sum(x["loss"] for x in logs[:3]) / 3, sum(x["loss"] for x in logs[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert {"pmod/w_mean", "pmod/w_std", "pmod/w_saturated", "pmod/processed/L1"} <= logs[-1].keys()
    # The vision tower stays frozen; the result reloads as a p-MoD model.
    before, after = _weights(Path(train_setup["model"])), _weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    import pmod

    model = pmod.load(tmp_path)
    assert pmod.is_routed_model(model)
    # Every image gives 16 vision tokens (32 px, patch 8), of which a layer of ratio R keeps floor(16 R).
    processed = {k: v for k, v in logs[-1].items() if k.startswith("pmod/processed/")}
    ratios = pmod.layer_ratios(model)
    assert processed == pytest.approx({f"pmod/processed/L{i}": math.floor(16 * r) / 16
                                       for i, r in enumerate(ratios) if r is not None})  # fmt: skip



def test_routing_is_recorded_only_in_the_steps_that_log(
    train_setup: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing statistics cost a recording pass: it runs in every micro-batch of the steps the Trainer logs (2 and 4
    of 4 with --logging-steps 0.5, 2 micro-batches each) and in no other, and each of those steps logs them."""
    from pmod.recipes import trainer as trainer_module

    recorded = []
    inner = trainer_module.record_routing

    def counted(model):  # noqa: ANN001, ANN202
        recorded.append(1)
        return inner(model)

    monkeypatch.setattr(trainer_module, "record_routing", counted)
    flags = ("--max-steps", "4", "--logging-steps", "0.5", "--gradient-accumulation-steps", "2")
    trainer = train(parse_args(train_argv(train_setup, tmp_path, *flags)))
    logged = [log["step"] for log in trainer.state.log_history if "pmod/processed/L1" in log]
    assert logged == [2, 4] and len(recorded) == 4

class _StopAfter(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_resume_parity_and_atomic_checkpoints(train_setup: dict[str, str], tmp_path: Path) -> None:
    common = ("--max-steps", "6", "--save-strategy", "steps", "--save-steps", "3", "--group-by-modality-length")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(parse_args(train_argv(train_setup, straight, *common)))
    train(parse_args(train_argv(train_setup, broken, *common)), callbacks=[_StopAfter(3)])
    assert sorted(p.name for p in broken.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    resumed = train(parse_args(train_argv(train_setup, broken, *common, "--resume-from-checkpoint", "auto")))
    assert resumed.state.global_step == 6
    assert not [p for p in broken.iterdir() if p.name.startswith("tmp-")]
    a, b = _weights(straight), _weights(broken)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _checkpoints(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:]))


def test_save_total_limit_keeps_the_newest_and_resuming_works(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--save-total-limit 2 with a save every step: older checkpoints are deleted as new ones land; a run stopped
    at step 4 resumes from the newest one left and ends with the weights of a run that was never stopped."""
    common = ("--max-steps", "6", "--save-strategy", "steps", "--save-steps", "1", "--save-total-limit", "2",
              "--group-by-modality-length")  # fmt: skip
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train(parse_args(train_argv(train_setup, straight, *common)))
    assert _checkpoints(straight) == ["checkpoint-5", "checkpoint-6"]
    train(parse_args(train_argv(train_setup, broken, *common)), callbacks=[_StopAfter(4)])
    assert _checkpoints(broken) == ["checkpoint-3", "checkpoint-4"]
    capsys.readouterr()
    resumed = train(parse_args(train_argv(train_setup, broken, *common, "--resume-from-checkpoint", "auto")))
    assert f"resuming from {broken / 'checkpoint-4'}" in capsys.readouterr().err
    assert resumed.state.global_step == 6 and _checkpoints(broken) == ["checkpoint-5", "checkpoint-6"]
    a, b = _weights(straight), _weights(broken)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_vision_lr_gives_the_vision_tower_its_own_groups(train_setup: dict[str, str], tmp_path: Path) -> None:
    """--vision-lr unfreezes the tower: its parameters, and only they, train at that lr; weight decay spares biases
    and norms in both halves (names checked by hand, not by the Trainer's own rule)."""
    flags = ("--max-steps", "1", "--vision-lr", "1e-5", "--weight-decay", "0.1", "--lr-scheduler-type", "constant")
    trainer = train(parse_args(train_argv(train_setup, tmp_path, *flags)))
    named = list(trainer.model.named_parameters())
    assert all(p.requires_grad for _, p in named)
    names = {id(p): n for n, p in named}
    got = {(g["lr"], g["weight_decay"], frozenset(names[id(p)] for p in g["params"]))
           for g in trainer.optimizer.param_groups}  # fmt: skip
    want: dict[tuple[float, float], set[str]] = {}
    for name, _ in named:
        lr = 1e-5 if name.startswith("model.vision_tower.") else 1e-3
        decay = 0.0 if "bias" in name or "norm" in name else 0.1
        want.setdefault((lr, decay), set()).add(name)
    assert got == {(lr, decay, frozenset(group)) for (lr, decay), group in want.items()}
    before, after = _weights(Path(train_setup["model"])), _weights(tmp_path)
    assert any(not torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)  # the tower trained


@pytest.mark.parametrize("flag", ["--activation-checkpointing", "--gradient-checkpointing"])
def test_checkpointing_flag_under_either_name(train_setup: dict[str, str], tmp_path: Path, flag: str) -> None:
    """transformers 5.24 renamed the flag; both names turn it on, under the name this transformers reads, without
    a deprecation warning, and the decoder layers of the trained model run checkpointed."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpointing.*deprecated", category=FutureWarning)
        args = parse_args(train_argv(train_setup, tmp_path, "--max-steps", "1", flag))
    assert getattr(args.trainer, installed_name("activation_checkpointing")) is True
    layers = train(args).model.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_validate(recipe: Path) -> None:
    config = parse_args(["--config", str(recipe), "--model", "m", "--learning-rate", "3e-5", "--use-cpu"])
    targs = config.trainer
    assert targs.learning_rate == 3e-5  # the command line wins over the file
    assert getattr(targs, installed_name("activation_checkpointing")) is True  # under this transformers' name
    assert targs.lr_scheduler_type == "cosine" and targs.bf16 and targs.num_train_epochs == 1
    assert config.stage == "finetune" and not config.no_pmod and config.group_by_modality_length
    assert config.method_config().layer_ratios(32)[-1] == 0.15


def test_deepspeed_configs_parse() -> None:
    stages = {
        json.loads((ROOT / "recipes" / f"zero{s}.json").read_text())["zero_optimization"]["stage"] for s in (2, 3)
    }
    assert stages == {2, 3}


def test_bad_arguments() -> None:
    with pytest.raises(TrainError, match="--model"):
        parse_args(["--data-path", "x"])
    with pytest.raises(TrainError, match="stage"):
        parse_args(["--model", "m", "--stage", "bogus"])
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--not-a-flag", "1"])



def test_one_config_from_flags_a_recipe_file_or_python(train_setup: dict[str, str], tmp_path: Path) -> None:
    """The command line, ``TrainConfig.from_file`` and ``TrainConfig.from_values`` are one parser: the same settings
    give the same config, ``--recipe paper`` sits under the given Trainer values, and a mistake is one line."""
    recipe = ROOT / "recipes" / "llava15_7b_pmod.yaml"
    argv = ["--config", str(recipe), "--model", "m", "--learning-rate", "3e-5", "--pmod-beta", "0.25", "--use-cpu"]
    flags = parse_args(argv)
    from_file = TrainConfig.from_file(recipe, model="m", learning_rate=3e-5, pmod_beta=0.25, use_cpu=True)
    own = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("trainer", "method_settings")]
    assert [getattr(from_file, k) for k in own] == [getattr(flags, k) for k in own]
    assert from_file.method_config() == flags.method_config() and flags.method_config().beta == 0.25
    trainer_keys = ("learning_rate", "lr_scheduler_type", "per_device_train_batch_size", "save_steps", "output_dir")
    assert [getattr(from_file.trainer, k) for k in trainer_keys] == [getattr(flags.trainer, k) for k in trainer_keys]
    paper = TrainConfig.from_values({"model": "m", "stage": "pretrain", "recipe": "paper", "weight-decay": 0.1})
    assert (paper.trainer.learning_rate, paper.trainer.weight_decay) == (1e-3, 0.1)
    with pytest.raises(TrainError, match=r"^unknown settings \['bogus'\]; `pmod train --help` lists the flags$"):
        TrainConfig.from_values({"model": "m", "bogus": 1})
    with pytest.raises(TrainError, match=r"^the TrainConfig has no trainer arguments: pass trainer="):
        train(TrainConfig(model=train_setup["model"], data_path=train_setup["data"]))

_DIST_SCRIPT = """
import sys, torch, torch.distributed as dist
from pmod.recipes.train import parse_args
from pmod.recipes.training import train
trainer = train(parse_args(sys.argv[2:]))
rank = dist.get_rank() if dist.is_initialized() else 0
params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
torch.save({"params": params, "losses": losses}, f"{sys.argv[1]}/rank{rank}.pt")
"""


def _free_port() -> int:
    # torchrun hangs in rendezvous with --master_port 0, so hand it a port that is free now.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU (gloo) is tested on Linux")
def test_torchrun_two_processes_match_single(train_setup: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(_DIST_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    common = ("--max-steps", "3", "--group-by-modality-length", "--seed", "1")
    single, dist_out = tmp_path / "single", tmp_path / "dist"
    single.mkdir(), dist_out.mkdir()
    cmd = [sys.executable, str(script), str(single), *train_argv(train_setup, single, *common)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    argv = train_argv(train_setup, dist_out, *common)
    argv[argv.index("--per-device-train-batch-size") + 1] = "2"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    proc = subprocess.run(
        [*torchrun, str(script), str(dist_out), *argv], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1, one = (
        torch.load(p, weights_only=True) for p in (dist_out / "rank0.pt", dist_out / "rank1.pt", single / "rank0.pt")
    )
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(one["losses"]), rtol=0.05, atol=0.05)


def test_lora_merges_adapters_and_trains_routers_fully(train_setup: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import pmod

    flags = ("--max-steps", "3", "--learning-rate", "1e-2", "--lora-r", "4")
    train(parse_args(train_argv(train_setup, tmp_path, *flags)))
    model = pmod.load(tmp_path)  # a merged, plain p-MoD folder
    assert pmod.is_routed_model(model)
    before, after = _weights(Path(train_setup["model"])), _weights(tmp_path)
    new = set(after) - set(before)
    assert new and all(".router." in k for k in new)  # only routers are added; no adapter tensors remain
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_proj" in k for k in changed)  # adapters were merged into the targeted projections
    assert any("multi_modal_projector" in k for k in changed)  # trained fully (modules_to_save)
    untouched = [k for k in before if "embed_tokens" in k or "vision_tower" in k or "norm" in k]
    assert untouched and not changed & set(untouched)


def test_assemble_llava_from_parts(tmp_path: Path) -> None:
    """LLM + CLIP tower + original-LLaVA projector weights give a LLaVA model holding exactly those weights."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pmod.data.tokenizer import build_word_tokenizer
    from pmod.io.importers.llava_parts import assemble_llava
    from pmod.testing import tiny_llama_config

    tokenizer = build_word_tokenizer(synth.vocabulary())
    torch.manual_seed(0)
    lm = transformers_llama(tiny_llama_config(2, vocab=len(tokenizer)))
    lm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    vision = CLIPVisionModel(
        CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8)
    )  # fmt: skip
    vision.save_pretrained(tmp_path / "clip")
    projector = {
        "model.mm_projector.0.weight": torch.randn(64, 32), "model.mm_projector.0.bias": torch.randn(64),
        "model.mm_projector.2.weight": torch.randn(64, 64), "model.mm_projector.2.bias": torch.randn(64),
    }  # fmt: skip
    save_file(projector, str(tmp_path / "mm_projector.safetensors"))

    model, processor = assemble_llava(
        str(tmp_path / "llm"), str(tmp_path / "clip"), str(tmp_path / "mm_projector.safetensors")
    )
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, projector["model.mm_projector.0.weight"])
    assert torch.equal(model.model.multi_modal_projector.linear_2.bias, projector["model.mm_projector.2.bias"])
    assert torch.equal(model.model.language_model.layers[1].mlp.up_proj.weight, lm.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    tower, source = model.model.vision_tower.state_dict(), vision.state_dict()
    assert tower.keys() == source.keys() and all(torch.equal(tower[k], source[k]) for k in source)
    assert model.config.vision_feature_layer == -2
    from PIL import Image

    inputs = processor(
        text=["USER: <image>\nWhat color ? ASSISTANT:"], images=[Image.new("RGB", (32, 32))], return_tensors="pt"
    )
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        assert model(**inputs).logits.shape[-1] == len(tokenizer)


def transformers_llama(config):  # noqa: ANN001, ANN201
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config)


@pytest.mark.parametrize(
    ("flags", "method", "routed"),
    [
        (("--method", "mod", "--mod-layers", "1,2", "--mod-ratio", "0.25"), "mod", [1, 2]),
        (("--method", "gamma_mod", "--gamma-mod-layers", "1,3", "--gamma-mod-skip-ratio", "0.25"), "gamma_mod", [1, 3]),
    ],
)
def test_stage2_trains_other_methods(
    train_setup: dict[str, str], tmp_path: Path, flags: tuple[str, ...], method: str, routed: list[int]
) -> None:
    """MoD and gamma-MoD train, save and reload with their routers (the step's numbers against the reference:
    test_train_first_step.py)."""
    import pmod

    trainer = train(parse_args(train_argv(train_setup, tmp_path, "--max-steps", "3", *flags)))
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all(math.isfinite(log["loss"]) for log in logs) and logs[-1]["pmod/nonfinite_loss_steps"] == 0
    if method == "gamma_mod":
        assert all(log["pmod/routing_loss"] > 0 for log in logs)  # logged each step, and added to the loss
    model = pmod.load(tmp_path)
    assert pmod.get_method_config(model).method == method and sorted(pmod.routed_layers(model)) == routed
    before, after = _weights(Path(train_setup["model"])), _weights(tmp_path)
    routers = [k for k in after if k not in before]
    assert routers and all("router" in k for k in routers)


def test_a_routed_folder_keeps_its_routing_or_refuses_another(train_setup: dict[str, str], tmp_path: Path) -> None:
    """Stage 2 from a p-MoD folder goes on with its p-MoD routing; asking for MoD (or dense) there is refused in one
    line instead of training p-MoD under a --method mod command (what it did before)."""
    import pmod

    first = tmp_path / "pmod"
    train(parse_args(train_argv(train_setup, first, "--max-steps", "1")))
    routed = {**train_setup, "model": str(first)}
    for flags, asked in ((("--method", "mod"), "MoDConfig"), (("--method", "dense"), "a dense model"),
                         (("--pmod-max-ratio", "0.5"), "max_ratio=0.5")):  # fmt: skip
        with pytest.raises(TrainError, match=f"is already a pmod model, but this run asks for .*{asked}"):
            train(parse_args(train_argv(train_setup | routed, tmp_path / "no", "--max-steps", "1", *flags)))
        assert not (tmp_path / "no").exists()
    train(parse_args(train_argv(routed, tmp_path / "again", "--max-steps", "1", "--method", "pmod")))
    assert pmod.get_method_config(pmod.load(tmp_path / "again")) == pmod.get_method_config(pmod.load(first))


def test_method_flags_are_checked(train_setup: dict[str, str]) -> None:
    with pytest.raises(TrainError, match="--mod-ratio is a setting of method mod"):
        parse_args(["--model", "m", "--mod-ratio", "0.3"])
    with pytest.raises(TrainError, match="--pmod-beta"):
        parse_args(["--model", "m", "--pmod-beta", "x"])
    with pytest.raises(TrainError, match="unknown method"):
        parse_args(["--model", "m", "--method", "moe"])
    config = parse_args(["--model", "m", "--pmod-ratios", "none,0.5,dense,0.25", "--pmod-schedule", "explicit"])
    assert config.method_config().layer_ratios(4) == [None, 0.5, None, 0.25]
    config = parse_args(["--model", "m", "--no-pmod"])
    assert config.method_config() is None


class _OverflowOnce(TrainerCallback):
    """Makes every MoD router's bias infinite for one step (unbounded router weights overflowing), then restores
    it."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if state.global_step == self.step:
            routers = [m.router for m in model.modules() if hasattr(m, "router")]
            self.saved = [r.bias.detach().clone() for r in routers]
            with torch.no_grad():
                for r in routers:
                    r.bias.fill_(float("inf"))

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if self.saved is not None:
            with torch.no_grad():
                for r, b in zip([m.router for m in model.modules() if hasattr(m, "router")], self.saved):
                    r.bias.copy_(b)
            self.saved = None


def test_nonfinite_losses_are_counted_and_skipped(train_setup: dict[str, str], tmp_path: Path) -> None:
    flags = ("--max-steps", "4", "--method", "mod", "--mod-layers", "1,2", "--max-grad-norm", "1.0")
    trainer = train(parse_args(train_argv(train_setup, tmp_path, *flags)), callbacks=[_OverflowOnce(1)])
    assert trainer.nonfinite_loss_steps == 1
    assert trainer.state.global_step == 4  # the run went on
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs[-1]["pmod/nonfinite_loss_steps"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
