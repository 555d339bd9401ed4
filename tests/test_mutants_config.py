"""Tests written to kill the mutants of ``pmod.core.config`` that survived the rest of the suite (see
``benchmarks/mutation/run_mutation.py`` and ``benchmarks/results/mutation.json``): reading settings from text and
YAML (``parse_field``), the registry, and the stored ``config.json`` entry. Each expected value is written out by
hand, never taken from the code under test."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import pytest

import pmod
from pmod.core.config import (
    MethodConfig,
    config_from_stored,
    method_class,
    method_names,
    parse_field,
    register_method,
    settable_fields,
    store_method_config,
    stored_method_config,
)


@dataclass
class PluginConfig(MethodConfig):
    """A third-party method's settings, with the field types ``parse_field`` documents and pmod's own methods lack."""

    method: ClassVar[str] = "plugin_for_tests"  # never registered: the registry stays pmod's own
    which: str | list[int] = field(default="all", metadata={"help": "a name or layers"})
    names: list[str] = field(default_factory=list)
    nothing: None = None
    anything: Any = None
    options: dict[str, int] = field(default_factory=dict)
    plain: dict = field(default_factory=dict)
    pair: tuple[int, int] = (0, 0)
    derived: int = field(default=0, init=False, metadata={"help": "computed"})


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("1", True), ("yes", True), ("on", True), (" ON ", True), ("True", True),
    ("false", False), ("0", False), ("no", False), ("off", False), (" Off", False), ("FALSE", False),
])  # fmt: skip
def test_every_spelling_of_a_bool(text: str, expected: bool) -> None:
    assert parse_field(pmod.PModConfig, "string", text) is expected


def test_a_bool_that_is_neither() -> None:
    with pytest.raises(ValueError, match=r"^string must be true or false, got 'maybe'$"):
        parse_field(pmod.PModConfig, "string", "maybe")
    assert parse_field(pmod.PModConfig, "string", False) is False  # YAML's own bool is kept


@pytest.mark.parametrize("text", ["none", "null", "dense", "", " NULL ", "Dense"])
def test_words_for_nothing_in_an_optional_field(text: str) -> None:
    assert parse_field(pmod.GammaMoDConfig, "arank_file", text) is None
    assert parse_field(pmod.PModConfig, "weight_scale", text) is None


def test_a_name_is_kept_as_written() -> None:
    # str | None: a file name is a string, not a list (no comma) and not "none".
    assert parse_field(pmod.GammaMoDConfig, "arank_file", "ranks.json") == "ranks.json"
    # Literal | list[int]: a name that is not a list goes to the Literal, a list to the list.
    assert parse_field(pmod.GammaMoDConfig, "layers", "arank") == "arank"
    assert parse_field(pmod.MoDConfig, "layers", "interleave") == "interleave"
    assert parse_field(pmod.GammaMoDConfig, "layers", "2,4") == [2, 4]


def test_integer_lists_from_yaml_and_text() -> None:
    assert parse_field(pmod.PModConfig, "layers", [1, 2]) == [1, 2]  # a YAML list of numbers
    assert parse_field(pmod.PModConfig, "layers", "3-3") == [3]  # a range of one layer (a <= b)
    assert parse_field(pmod.PModConfig, "layers", "1,4-6") == [1, 4, 5, 6]
    assert parse_field(pmod.PModConfig, "layers", "-3") == [-3]  # a negative number, not a range (checked later)
    assert parse_field(pmod.PModConfig, "ratios", [0.5, None, 0.25]) == [0.5, None, 0.25]
    assert parse_field(pmod.PModConfig, "ratios", "0.5, dense ,0.25") == [0.5, None, 0.25]


def test_integers_from_yaml_floats() -> None:
    assert parse_field(pmod.FastVConfig, "layer", 3.0) == 3
    with pytest.raises(ValueError, match=r"^layer must be an integer, got 2\.5$"):
        parse_field(pmod.FastVConfig, "layer", 2.5)
    with pytest.raises(ValueError, match=r"^layers must be an integer, got 2\.5$"):
        parse_field(pmod.PModConfig, "layers", [1, 2.5])


def test_dense_is_no_number() -> None:
    with pytest.raises(ValueError, match=r"^beta: 'dense' is not a number$"):
        parse_field(pmod.PModConfig, "beta", " Dense")


def test_error_lines_of_unreadable_items() -> None:
    # An item of an optional-ratio list: the item's own error, with the field's name.
    with pytest.raises(ValueError) as err:
        parse_field(pmod.PModConfig, "ratios", "0.5,x")
    assert str(err.value) == "ratios: cannot read 'x' (could not convert string to float: 'x')"
    # A list (it has a comma) is read as the list only: its error, not the Literal's too.
    with pytest.raises(ValueError) as err:
        parse_field(pmod.GammaMoDConfig, "layers", "2,x")
    assert str(err.value) == "invalid literal for int() with base 10: 'x'"
    # Not a list: every reading failed, the Literal's first (the order the type names them in).
    with pytest.raises(ValueError) as err:
        parse_field(pmod.GammaMoDConfig, "layers", "foo")
    assert str(err.value) == (
        "layers: cannot read 'foo' (layers must be one of arank, got 'foo'; invalid literal for int() with base 10: "
        "'foo')"
    )
    # An item with a dash that is no range a-b gets the range hint.
    with pytest.raises(ValueError, match=r"cannot read 'X-3'; write a number or a range a-b such as 2-26"):
        parse_field(pmod.PModConfig, "layers", "X-3")


def test_a_plugins_field_types() -> None:
    # str | list[int]: a list when it reads as one, else the name.
    assert parse_field(PluginConfig, "which", "2,3") == [2, 3]
    assert parse_field(PluginConfig, "which", "all") == "all"
    assert parse_field(PluginConfig, "names", "a, b") == ["a", "b"]  # items are stripped
    for text in ("none", " Dense", "NULL"):
        assert parse_field(PluginConfig, "nothing", text) is None
    assert parse_field(PluginConfig, "nothing", None) is None
    with pytest.raises(ValueError, match=r"^nothing: expected none, got 'x'$"):
        parse_field(PluginConfig, "nothing", "x")
    value = {"k": [1]}
    assert parse_field(PluginConfig, "anything", value) is value  # Any and dict: the YAML value as it is
    assert parse_field(PluginConfig, "options", value) is value
    assert parse_field(PluginConfig, "plain", value) is value
    with pytest.raises(TypeError, match=r"^pair: unsupported field type"):
        parse_field(PluginConfig, "pair", "1,2")


def test_settable_fields() -> None:
    assert [f.name for f in settable_fields(PluginConfig)] == [
        "which", "names", "nothing", "anything", "options", "plain", "pair",
    ]  # fmt: skip
    assert [f.name for f in settable_fields(pmod.PModConfig)] == [f.name for f in fields(pmod.PModConfig)]


def test_settings_of_pmod_0_2_with_the_empty_extra_field_still_load() -> None:
    """pmod 0.2 wrote an internal, always empty ``extra`` with p-MoD's settings; it loads, anything else in it does
    not (that would be settings this version cannot honour)."""
    stored = pmod.PModConfig(beta=0.4).to_dict()
    assert pmod.PModConfig.from_dict({**stored, "extra": {}}) == pmod.PModConfig(beta=0.4)
    with pytest.raises(ValueError, match=r"Unknown p-MoD config keys \['extra'\]"):
        pmod.PModConfig.from_dict({**stored, "extra": {"beta": 0.3}})


def test_registry_order_and_registration() -> None:
    # p-MoD first, then by listing_order (MoD 1, gamma-MoD 2, FastV 3, PyramidDrop 4, DART 5); alphabetical would
    # put dart first.
    assert method_names() == ["pmod", "mod", "gamma_mod", "fastv", "pdrop", "dart", "visionzip"]
    assert register_method(pmod.PModConfig) is pmod.PModConfig  # registering again changes nothing
    assert method_class("pmod") is pmod.PModConfig


def test_a_stored_entry_without_a_method() -> None:
    with pytest.raises(ValueError) as err:
        config_from_stored({"settings": {"ratio": 0.5}})
    assert str(err.value) == "config.json's 'pmod_method' entry must be {'method': NAME, 'settings': {...}}."


def test_storing_replaces_a_legacy_entry_and_none_removes_the_method() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig()
    config.pmod = {"beta": 0.4}  # what pmod 0.1 stored
    store_method_config(config, pmod.PModConfig(beta=0.45))
    assert not hasattr(config, "pmod")
    assert config.pmod_method["method"] == "pmod" and config.pmod_method["settings"]["beta"] == 0.45
    assert stored_method_config(config) == pmod.PModConfig(beta=0.45)
    store_method_config(config, None)  # a dense model: no method entry at all
    assert not hasattr(config, "pmod_method") and stored_method_config(config) is None
    store_method_config(config, None)  # and nothing to remove is fine
    assert not hasattr(config, "pmod_method")
