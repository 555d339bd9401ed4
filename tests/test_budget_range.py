"""`pmod train --budget-range LO,HI` (issue 26): every forward of an optimizer step runs the routed ratios that
pmod.set_budget chooses for that step's draw, a resumed run draws what an unbroken one would, the trained budget is
what stays in memory and on disk, and bad ranges are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_train import train_argv  # the same short CPU run as test_train's
from transformers import TrainerCallback

import pmod
from pmod.recipes.train import TrainError, parse_args
from pmod.recipes.training import train
from pmod.testing import tiny_llava

SEED = 7
LOW, HIGH = 0.85, 0.98  # within the tiny p-MoD model's reach (0.8306 to 1.0009 of dense's TFLOPs)
N_VISION, N_TEXT = 16, 64  # the tiny model's image: (32 px / 8 px)^2 patches; the documented text length


class StopAfter(TrainerCallback):
    """Stops training after ``step`` optimizer steps (a killed run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        control.should_training_stop = state.global_step >= self.step
        return control


def drawn(step: int, low: float = LOW, high: float = HIGH, seed: int = SEED) -> float:
    """The documented draw of a step, written again here."""
    value = float(np.random.default_rng([seed, step]).uniform(low, high))
    return min(high, max(low, round(value, 3)))


def set_budget_ratios(model: object, budget: float) -> tuple[float | None, ...]:
    """The layer ratios pmod.set_budget gives ``model`` (a freshly converted one) at ``budget``."""
    pmod.set_budget(model, budget, n_vision=N_VISION, n_text=N_TEXT)
    return tuple(pmod.layer_ratios(model))


class _SeenRatios(TrainerCallback):
    """Records, for every forward of the model, the optimizer step it belongs to and the ratios of every layer then
    (a forward pre-hook on the first routed layer)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[float | None, ...]]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        routed = pmod.routed_layers(model)

        def record(*_: object) -> None:
            self.seen.append((state.global_step, tuple(pmod.layer_ratios(model))))

        routed[min(routed)].register_forward_pre_hook(record)
        return control


def _fresh(train_setup: dict[str, str]) -> object:
    return pmod.convert(pmod.load(train_setup["model"]), pmod.PModConfig())


def test_each_step_runs_at_its_drawn_budget_and_the_trained_budget_is_kept(
    train_setup: dict[str, str], tmp_path: Path
) -> None:
    seen = _SeenRatios()
    argv = train_argv(train_setup, tmp_path, "--max-steps", "3", "--per-device-train-batch-size", "2",
                      "--gradient-accumulation-steps", "2", "--seed", str(SEED),
                      "--budget-range", f"{LOW},{HIGH}")  # fmt: skip
    trainer = train(parse_args(argv), callbacks=[seen])
    trained = tuple(pmod.layer_ratios(_fresh(train_setup)))
    expected = [(step, set_budget_ratios(_fresh(train_setup), drawn(step))) for step in range(3) for _ in range(2)]
    assert seen.seen == expected  # both micro-batches of a step at the step's budget
    (callback,) = (c for c in trainer.callback_handler.callbacks if type(c).__name__ == "BudgetRange")
    assert callback.budgets == {step: drawn(step) for step in range(3)}
    assert len({ratios for _, ratios in expected} | {trained}) == 4  # each draw moved the ratios
    assert tuple(pmod.layer_ratios(trainer.model)) == trained  # restored after training
    saved = json.loads((tmp_path / "config.json").read_text())
    assert pmod.core.config.stored_method_config(saved) == pmod.get_method_config(_fresh(train_setup))
    assert tuple(pmod.layer_ratios(pmod.load(tmp_path))) == trained


def test_a_resumed_run_draws_what_an_unbroken_one_would(train_setup: dict[str, str], tmp_path: Path) -> None:
    argv = train_argv(train_setup, tmp_path, "--max-steps", "4", "--save-strategy", "steps", "--save-steps", "2",
                      "--seed", str(SEED), "--budget-range", f"{LOW},{HIGH}")  # fmt: skip
    first, second = _SeenRatios(), _SeenRatios()
    train(parse_args(argv), callbacks=[first, StopAfter(2)])
    resumed = train(parse_args([*argv, "--resume-from-checkpoint", "auto"]), callbacks=[second])
    (callback,) = (c for c in resumed.callback_handler.callbacks if type(c).__name__ == "BudgetRange")
    assert callback.budgets == {2: drawn(2), 3: drawn(3)}
    assert [step for step, _ in first.seen] == [0, 1] and [step for step, _ in second.seen] == [2, 3]
    for step, ratios in first.seen + second.seen:
        assert ratios == set_budget_ratios(_fresh(train_setup), drawn(step)), step
    checkpoint = json.loads((tmp_path / "checkpoint-2" / "config.json").read_text())
    assert pmod.core.config.stored_method_config(checkpoint) == pmod.get_method_config(_fresh(train_setup))


@pytest.mark.parametrize("config", [pmod.MoDConfig(ratio=0.5), pmod.GammaMoDConfig(layers=[1, 2, 3])])
def test_other_trained_methods_move_as_set_budget_moves_them(config: object) -> None:
    """The callback alone, on MoD and gamma-MoD models: step k's ratios are set_budget's at the draw of k, and the
    end of the step puts the trained ones back."""
    from pmod.recipes.budget_range import BudgetRange

    model = pmod.convert(tiny_llava(num_layers=4, image_size=32, patch_size=8), config)
    trained = tuple(pmod.layer_ratios(model))
    low, high = 0.96, 0.99
    callback = BudgetRange(model, low, high, seed=SEED)
    for step in (0, 5, 11):
        state = SimpleNamespace(global_step=step)
        callback.on_step_begin(None, state, None)
        fresh = pmod.convert(tiny_llava(num_layers=4, image_size=32, patch_size=8), config)
        assert tuple(pmod.layer_ratios(model)) == set_budget_ratios(fresh, drawn(step, low, high)) != trained
        callback.on_step_end(None, state, None)
        assert tuple(pmod.layer_ratios(model)) == trained


BAD = [
    (("--budget-range", "0.8,0.3"), r"--budget-range 0.8,0.3: LO is above HI; give LO,HI, e.g. 0.3,0.8"),
    (("--budget-range", "0,0.5"), r"--budget-range 0.0,0.5: budgets are shares of dense's TFLOPs in \(0, 1\]"),
    (("--budget-range", "0.5,1.5"), r"--budget-range 0.5,1.5: budgets are shares of dense's TFLOPs in \(0, 1\]"),
    (("--budget-range", "0.5"), r"--budget-range '0.5': give two shares of dense's TFLOPs as LO,HI, e.g. 0.3,0.8"),
    (("--budget-range", "0.3,0.8", "--method", "dense"), r"--budget-range moves the ratios of trained routed layers"),
    (("--budget-range", "0.3,0.8", "--stage", "pretrain"),
     r"--budget-range moves the ratios of trained routed layers: use it with --stage finetune and a routed"),
]


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_ranges_are_refused_before_training(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(TrainError, match=f"^{message}"):
        parse_args(["--model", "m", "--data-path", "d", *flags])


def test_a_range_out_of_reach_names_the_reachable_one(
    train_setup: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pmod.cli import main

    assert main(["train", *train_argv(train_setup, tmp_path / "out", "--budget-range", "0.5,0.9")]) == 2
    err = capsys.readouterr().err.strip()
    with pytest.raises(ValueError) as reach:  # set_budget's own refusal names the reachable range
        pmod.set_budget(_fresh(train_setup), 0.5, n_vision=N_VISION, n_text=N_TEXT)
    assert "reaches tflops shares 0.8" in str(reach.value)
    assert err == (f"pmod train: error: --budget-range 0.5,0.9: {reach.value} (for one image of 16 vision and 64 text "
                   f"tokens)")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_recipe_file_gives_the_range_as_a_list_or_text(tmp_path: Path) -> None:
    for value, expected in (("[0.3, 0.8]", (0.3, 0.8)), ('"0.25,0.5"', (0.25, 0.5))):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"budget_range: {value}\n")
        margs = parse_args(["--model", "m", "--data-path", "d", "--config", str(recipe)])
        assert margs.check_budget_range() == expected


def test_the_demo_trains_its_routed_variants_over_the_range(train_setup: dict[str, str], tmp_path: Path) -> None:
    """`pmod demo --budget-range` / `pmod ablate --budget-range` (DemoSettings.budget_range): a routed variant's
    every forward runs the ratios set_budget gives the step's draw (with the demo's seed); the dense variant trains as
    it would without the range (a range on a dense run is refused, so its run finishing shows it got none)."""
    from pmod.experiments.demo import DemoSettings
    from pmod.experiments.demo_runs import train_config

    settings = DemoSettings(steps=3, batch_size=2, seed=SEED, budget_range=f"{LOW},{HIGH}")
    data = Path(train_setup["data"]).parent
    seen = _SeenRatios()
    train_config(pmod.PModConfig(), Path(train_setup["model"]), data, tmp_path / "pmod", settings, callbacks=[seen])
    assert sorted({step for step, _ in seen.seen}) == [0, 1, 2]
    for step, ratios in seen.seen:
        assert ratios == set_budget_ratios(_fresh(train_setup), drawn(step)), step
    run = train_config(None, Path(train_setup["model"]), data, tmp_path / "dense", settings)
    assert len(run["loss"]) >= 1
    assert "drawn per step from 0.85-0.98 of dense's TFLOPs" in settings.training_summary()


@pytest.mark.parametrize("command", ["demo", "ablate"])
def test_demo_and_ablate_refuse_a_bad_range_in_one_line(command: str, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from pmod.cli import main

    assert main([command, "--budget-range", "0.9,0.5", "--out", str(tmp_path / "x")]) == 2
    assert "LO is above HI" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
