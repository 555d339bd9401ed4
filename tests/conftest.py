"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest

from pmod.core import packed_attention
from pmod.data import synth
from pmod.testing import tiny_llava_folder


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
