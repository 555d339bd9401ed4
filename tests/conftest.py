"""Fixtures shared by several test files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pmod.core import packed_attention
from pmod.data import synth
from pmod.testing import tiny_llava_folder

#: The tests' tiny demo task and model: `pmod demo --quick` and `pmod ablate --quick` run these in the tests (the
#: README's commands, tests/test_docs.py; the demo's report, tests/test_demo.py), not the quick size users run.
TINY_DEMO: dict[str, Any] = dict(
    samples=48, image_size=32, patch_size=8, layers=4, hidden=32, vision_hidden=32, vision_layers=2,
    vision_pretrain_steps=1, steps=2, batch_size=4, eval_samples=4,
)  # fmt: skip


def tiny_ablation() -> Any:
    """Every `pmod ablate` variant, 2 seeds, on a model and budget that run in seconds (the tests' --quick)."""
    from pmod.experiments.ablate import AblateSettings
    from pmod.experiments.demo import DemoSettings

    task = DemoSettings(
        samples=120, image_size=32, patch_size=8, layers=6, hidden=32, vision_hidden=32, vision_layers=2,
        vision_pretrain_steps=5, steps=4, batch_size=4, eval_samples=12, seeds=2,
    )  # fmt: skip
    return AblateSettings(task=task, quick=True)


def run_quick(command: str, folder: Path, patch: pytest.MonkeyPatch) -> tuple[Path, dict[str, Any]]:
    """``pmod <command> --quick`` (the README's `pmod demo` / `pmod ablate` at the tests' size) in ``folder``, as a
    user runs it there: it writes ./pmod-<command>. Returns that folder and its report."""
    from pmod.cli import main
    from pmod.experiments.ablate import AblateSettings
    from pmod.experiments.demo import DemoSettings

    patch.setattr(DemoSettings, "quick", classmethod(lambda cls: cls(**TINY_DEMO)))
    patch.setattr(AblateSettings, "quick_settings", classmethod(lambda cls: tiny_ablation()))
    patch.chdir(folder)
    assert main([command, "--quick"]) == 0
    out = folder / f"pmod-{command}"
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The README's `pmod demo` at the tests' size (TINY_DEMO), run once for the session: its folder and report."""
    with pytest.MonkeyPatch.context() as patch:
        return run_quick("demo", tmp_path_factory.mktemp("demo"), patch)


@pytest.fixture(scope="session")
def quick_ablation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The README's `pmod ablate` at the tests' size (tiny_ablation), run once for the session: folder, report."""
    with pytest.MonkeyPatch.context() as patch:
        return run_quick("ablate", tmp_path_factory.mktemp("ablate"), patch)


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny LLaVA folder and 48 synthetic training records (the `pmod train` tests' model and data)."""
    root = tmp_path_factory.mktemp("train")
    model = tiny_llava_folder(str(root / "model"), num_layers=4, image_size=32, patch_size=8)
    train_json, _ = synth.generate(root / "data", 48, seed=0, image_size=32)
    return {"model": model, "data": str(train_json), "root": str(root)}


@pytest.fixture
def packed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the packed attention calls (one per routed layer that packs), so a test knows the path it checks ran."""
    calls = [0]
    inner = packed_attention.packed_causal_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(packed_attention, "packed_causal_attention", counted)
    return calls
