"""Names that said "pmod" of what serves every method were renamed (``PModCache`` -> ``RoutedCache``, ...): the old
public names still work for one release and warn with the new name; nothing of pmod itself uses them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import pmod
from pmod import PModConfig
from pmod.core import cache as cache_module
from pmod.core.routed_layer import RoutingInputs
from pmod.testing import randomize_routers, tiny_llama, tiny_llava_folder

SRC = Path(pmod.__file__).parent


def deprecation(old: str, new: str) -> str:
    return re.escape(f"{old} is deprecated and will be removed in the next release; use {new}.")


@pytest.mark.parametrize("old", sorted(pmod.RENAMED))
def test_old_public_names_resolve_to_the_new_with_a_warning_at_the_caller(old: str) -> None:
    new = pmod.RENAMED[old]
    assert new in pmod.EXPORTS and old not in pmod.EXPORTS and old not in pmod.__all__
    with pytest.warns(DeprecationWarning, match=deprecation(f"pmod.{old}", f"pmod.{new}")) as record:
        assert getattr(pmod, old) is getattr(pmod, new)
    assert record[0].filename == __file__  # the warning names the line that used the old name
    with pytest.warns(DeprecationWarning):  # not cached in the module: every use warns
        getattr(pmod, old)


def test_old_names_by_from_import_and_in_their_modules() -> None:
    with pytest.warns(DeprecationWarning, match=deprecation("pmod.PModCache", "pmod.RoutedCache")):
        from pmod import PModCache
    assert PModCache is pmod.RoutedCache
    old = "pmod.core.cache.PModStaticCache"
    with pytest.warns(DeprecationWarning, match=deprecation(old, "pmod.core.cache.RoutedStaticCache")):
        assert cache_module.PModStaticCache is cache_module.RoutedStaticCache
    with pytest.raises(AttributeError, match="module 'pmod.core.cache' has no attribute 'PModNothing'"):
        cache_module.PModNothing  # noqa: B018


def test_the_lmms_eval_model_keeps_its_old_class_name() -> None:
    lmms_model = pytest.importorskip("pmod.eval.lmms_model", exc_type=ImportError)
    old, new = "pmod.eval.lmms_model.PModLMM", "pmod.eval.lmms_model.RoutedLMM"
    with pytest.warns(DeprecationWarning, match=deprecation(old, new)):
        assert lmms_model.PModLMM is lmms_model.RoutedLMM


def test_tiny_llava_folder_takes_its_old_keyword_with_a_warning(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match=deprecation("tiny_llava_folder(pmod_config=...)", "method_config=")):
        tiny_llava_folder(str(tmp_path / "old"), num_layers=2, pmod_config=PModConfig(beta=0.45))
    tiny_llava_folder(str(tmp_path / "new"), num_layers=2, method_config=PModConfig(beta=0.45))
    old, new = (json.loads((tmp_path / name / "config.json").read_text())["pmod_method"] for name in ("old", "new"))
    assert old == new == {"method": "pmod", "settings": PModConfig(beta=0.45).to_dict()}
    with pytest.raises(TypeError, match=r"takes method_config= \(pmod_config= is its old name\), not both"):
        tiny_llava_folder(str(tmp_path / "both"), method_config=PModConfig(), pmod_config=PModConfig())


def test_a_routed_layer_takes_its_old_routing_keyword_with_a_warning() -> None:
    model = pmod.convert(tiny_llama(num_layers=2), PModConfig(schedule="explicit", ratios=[None, 0.5]))
    randomize_routers(model, scale=3.0)
    layer = model.model.layers[1]
    hidden = torch.randn(1, 4, model.config.hidden_size)
    pos = model.model.rotary_emb(hidden, torch.arange(4)[None])
    routing = RoutingInputs(vision_mask=torch.ones(1, 4, dtype=torch.bool))
    with torch.no_grad():
        new = layer(hidden, position_embeddings=pos, routing=routing)
        warning = deprecation("the pmod_routing keyword of a routed layer", "routing")
        with pytest.warns(DeprecationWarning, match=warning):
            old = layer(hidden, position_embeddings=pos, pmod_routing=routing)
        unrouted = layer(hidden, position_embeddings=pos)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    assert not torch.equal(new, unrouted)  # the keyword reached the layer: half the vision tokens skipped it


def test_pmod_itself_uses_no_old_name() -> None:
    """Only the rename tables (and the shims that read them) may spell an old name."""
    old = re.compile(r"\b(PModCache|PModStaticCache|PModLMM|PModTrainer|pmod_layers\(|is_pmod_model|get_pmod_config"
                     r"|pmod_routing|as_pmod_cache|pmod_slot_mask|pmod_extend_slots)\b")  # fmt: skip
    allowed = {"__init__.py", "core/cache.py", "core/routed_layer.py", "eval/lmms_model.py"}
    found = [
        f"{p.relative_to(SRC)}:{i}"
        for p in SRC.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if old.search(line) and str(p.relative_to(SRC)) not in allowed
    ]
    assert found == []
