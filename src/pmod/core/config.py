"""The base of the method configs, the method registry, and where a method's settings live in ``config.json``.

A method config is a dataclass of settings (``pmod.PModConfig``, ``pmod.MoDConfig``, ...). ``save_pretrained``
stores it under one key, ``"pmod_method"``: ``{"method": "<name>", "settings": {...}}``. Folders saved by pmod 0.1
hold p-MoD settings under ``"pmod"``; they are read as a ``PModConfig``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pmod.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

#: The config.json key of the method and its settings.
CONFIG_KEY = "pmod_method"
#: The key pmod 0.1 stored p-MoD settings under.
LEGACY_KEY = "pmod"
#: The method used where none is named (``pmod.convert(model)``, ``pmod flops``, ``pmod train``): p-MoD.
DEFAULT_METHOD = "pmod"

_METHODS: dict[str, type[MethodConfig]] = {}
#: The package whose modules register pmod's own methods; imported on the first lookup (a plugin load by name, so
#: that core names no method). Method configs import no torch, so this stays light.
BUILTIN_METHODS = "pmod.methods"


def _registry() -> dict[str, type[MethodConfig]]:
    importlib.import_module(BUILTIN_METHODS)
    return _METHODS


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer of a converted model computes, for the analytic cost (``pmod.analysis.analytic_flops``).

    Attributes:
        ratio: share of the routable tokens the layer processes (``floor(ratio * n_routable)``); None: a dense
            layer that processes every token.
        router_outputs: width of a ``Linear(hidden, router_outputs)`` router run on every token entering the layer
            (0: no router).
        routes_text: the routable tokens include the text outside the question (gamma-MoD), not only vision tokens.
        scores_last_token: the layer also computes each row's last-token attention row over all tokens from its own
            q/k (FastV's ranking, one extra key projection over the sequence).
        rounding: how the kept count is rounded: ``"floor"`` (``floor(ratio * n)``) or ``"round"`` (FastV).
    """

    ratio: float | None = None
    router_outputs: int = 0
    routes_text: bool = False
    scores_last_token: bool = False
    rounding: str = "floor"


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method config known by its ``method`` name (for ``from_dict`` and the CLI)."""
    _METHODS[cls.method] = cls
    return cls


def method_names() -> list[str]:
    """Names of the registered methods, in their ``listing_order`` (p-MoD first)."""
    registry = _registry()
    return sorted(registry, key=lambda name: (registry[name].listing_order, name))


def method_class(name: str) -> type[MethodConfig]:
    registry = _registry()
    if name not in registry:
        raise ValueError(f"Unknown routing method {name!r}; this pmod knows {', '.join(method_names())}.")
    return registry[name]


@dataclass
class MethodConfig:
    """Base of every method config: settings only; :meth:`build` turns them into per-layer routing rules.

    Subclasses set ``method`` (the registry name), ``paper`` and ``trainable``, implement :meth:`layer_ratios`,
    :meth:`layer_plan` and :meth:`build`, and say their settings in :meth:`describe`.
    """

    method: ClassVar[str] = ""
    #: The method's name as papers write it ("p-MoD", "gamma-MoD").
    display_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: Whether the method has parameters to train (FastV has none: ``pmod train`` refuses it).
    trainable: ClassVar[bool] = True
    #: Where the method appears in lists (help texts, tables).
    listing_order: ClassVar[int] = 100
    #: Whether the method acts through routed decoder layers; False for a method that only shortens the sequence
    #: before the decoder (VisionZip), whose model has no routed layer by design.
    routes_layers: ClassVar[bool] = True

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        """Per-layer share of the routable tokens processed (None = a dense layer)."""
        raise NotImplementedError

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        """What each layer computes, for the analytic cost."""
        raise NotImplementedError

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, Any]:
        """Create the method's routers on ``decoder`` / ``layers`` and return the routing rule of every layer that
        needs one (layer index -> rule). Called once per conversion, before the layers are switched."""
        raise NotImplementedError

    def attach(self, model: nn.Module, adapter: Any) -> None:
        """Set up what the method does outside the decoder layers (VisionZip: the vision tokens reduced before the
        decoder), on the top-level ``model`` with its family's ``adapter``. Called once per conversion, after
        :meth:`build`; nothing by default."""

    def describe(self, num_layers: int) -> str:
        """The settings in a few words, for reports (``pmod flops``): e.g. ``"FastV K=2 keep 0.5"``."""
        return self.method

    def resolved(self, num_layers: int) -> MethodConfig:
        """The config with everything a saved model needs made explicit (e.g. layers chosen from a file)."""
        return self

    def budget_knob(self) -> tuple[str, float, float] | None:
        """The setting that moves this method's cost, and the range it may take (``field``, low, high), for
        :func:`pmod.analysis.budget.at_budget`; None when the method has no single cost knob."""
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        # pmod 0.2 stored an internal, always empty "extra" field with p-MoD's settings: such folders keep loading.
        data = {k: v for k, v in data.items() if not (k == "extra" and v == {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown {cls.display_name or cls.method} config keys {sorted(unknown)}; this pmod version knows "
                f"{sorted(known)}. "
                f"Upgrade pmod or remove the keys from config.json."
            )
        return cls(**data)

    def stored(self) -> dict[str, Any]:
        """The value stored under :data:`CONFIG_KEY`."""
        return {"method": self.method, "settings": self.to_dict()}


def config_from_stored(value: dict[str, Any]) -> MethodConfig:
    """The method config of a :data:`CONFIG_KEY` value."""
    if not isinstance(value, dict) or "method" not in value:
        raise ValueError(f"config.json's {CONFIG_KEY!r} entry must be {{'method': NAME, 'settings': {{...}}}}.")
    return method_class(value["method"]).from_dict(dict(value.get("settings") or {}))


def stored_method_config(config: Any) -> MethodConfig | None:
    """The method config stored in a transformers config or a config.json dict (None for a dense model).

    Reads :data:`CONFIG_KEY`, or a pmod 0.1 :data:`LEGACY_KEY` entry as p-MoD settings.
    """

    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    value = get(CONFIG_KEY)
    if value is not None:
        return config_from_stored(value)
    legacy = get(LEGACY_KEY)
    if legacy is not None:
        return method_class("pmod").from_dict(dict(legacy))
    return None


def store_method_config(config: Any, method_config: MethodConfig | None) -> None:
    """Write (or, with None, remove) the method entry of a transformers config; drops a pmod 0.1 entry."""
    if hasattr(config, LEGACY_KEY):
        delattr(config, LEGACY_KEY)
    if method_config is None:
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        return
    setattr(config, CONFIG_KEY, method_config.stored())


# ------------------------------------------------------------------------------------------- settings from text
def settable_fields(cls: type[MethodConfig]) -> list[dataclasses.Field]:
    """The fields a user sets (every field of the constructor)."""
    return [f for f in dataclasses.fields(cls) if f.init]


def parse_field(cls: type[MethodConfig], name: str, value: Any) -> Any:
    """A field's value from text (command line) or from YAML/JSON, by the field's type annotation.

    Lists are comma-separated (``"2,3,4"``); in a list of integers an item ``a-b`` is the range a, a+1, ..., b
    (``"1,3-5"`` is 1,3,4,5); in a list of optional ratios ``none`` or ``dense`` is a dense layer; a field typed
    ``str | list[int]`` takes either a name or a list.
    """
    hints = typing.get_type_hints(cls)
    return _parse(hints[name], value, name)


def setting_key(method: str, name: str) -> str:
    """A method's field where settings of several methods stand side by side: ``<method>_<field>`` (``fastv_keep``),
    the key of a YAML recipe and of an lmms-eval model arg, and the destination of the flag ``--fastv-keep``."""
    return f"{method}_{name}"


def setting_keys(method: str) -> dict[str, str]:
    """``<method>_<field>`` -> field, for every settable field of ``method``, in the fields' order."""
    return {setting_key(method, f.name): f.name for f in settable_fields(method_class(method))}


def given_settings(values: Mapping[str, Any], method: str) -> dict[str, Any]:
    """field -> value of the ``<method>_<field>`` entries of ``values`` that are given (None: not given)."""
    return {name: values[key] for key, name in setting_keys(method).items() if values.get(key) is not None}


def config_from_settings(
    method: str,
    settings: Mapping[str, Any],
    base: MethodConfig | None = None,
    label: Callable[[str], str] = str,
) -> MethodConfig:
    """The config of ``method`` from field values (field -> text from a flag or a model arg, or a YAML value), on
    top of ``base`` (default: the method's defaults): the one reading of ``<method>_<field>`` settings for the CLI
    flags, YAML recipes and lmms-eval model args. A value that cannot be read raises :class:`UserError`
    ``"<label(key)>: <why>"`` (``key`` its ``<method>_<field>``); settings the config refuses,
    ``"<method> settings: <why>"``."""
    cls = method_class(method)
    parsed = {}
    for name, value in settings.items():
        try:
            parsed[name] = parse_field(cls, name, value)
        except (TypeError, ValueError) as err:
            raise UserError(f"{label(setting_key(method, name))}: {err}") from err
    try:
        return dataclasses.replace(base, **parsed) if base is not None else cls(**parsed)
    except (TypeError, ValueError) as err:
        raise UserError(f"{method} settings: {err}") from err


#: An item of a list of integers written as a range, ``a-b`` (both ends included).
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
#: Text meant as a list even without a comma: a (possibly malformed) range such as ``2-26`` or ``2-``.
_LISTY = re.compile(r"\d\s*-")


def _int_items(value: Any, name: str) -> list[int]:
    """One item of a list of integers: a number, or a range ``a-b`` (a <= b) as the numbers a..b."""
    if not isinstance(value, str) or "-" not in value.strip().lstrip("-"):
        return [_parse(int, value.strip() if isinstance(value, str) else value, name)]
    match = _RANGE.match(value)
    if match is None:
        raise ValueError(f"{name}: cannot read {value.strip()!r}; write a number or a range a-b such as 2-26")
    start, end = int(match.group(1)), int(match.group(2))
    if start > end:
        raise ValueError(f"{name}: the range {start}-{end} runs backwards; write {end}-{start}")
    return list(range(start, end + 1))


def _parse(tp: Any, value: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "dense", "")):
            if type(None) in args:
                return None
        errors = []
        # Literal and str first only when the text is not a list: "2,3" is a list, "arank" a name.
        listy = isinstance(value, (list, tuple)) or (isinstance(value, str) and ("," in value or _LISTY.search(value)))
        ordered = sorted(options, key=lambda a: (typing.get_origin(a) is list) != listy)
        for option in ordered:
            try:
                return _parse(option, value, name)
            except (TypeError, ValueError) as err:
                if listy and typing.get_origin(option) is list:
                    raise  # the list's own error names the item it cannot read
                errors.append(str(err))
        raise ValueError(f"{name}: cannot read {value!r} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        (item_type,) = args
        if item_type is int:
            return [n for v in items for n in _int_items(v, name)]
        return [_parse(item_type, v.strip() if isinstance(v, str) else v, name) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is float:
        if isinstance(value, str) and value.strip().lower() == "dense":
            raise ValueError(f"{name}: 'dense' is not a number")
        return float(value)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if tp is str:
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a name, got a list")
        return str(value)
    if tp is type(None):
        if value is None or str(value).strip().lower() in ("none", "dense", "null"):
            return None
        raise ValueError(f"{name}: expected none, got {value!r}")
    if tp is Any or origin is dict or tp is dict:
        return value
    raise TypeError(f"{name}: unsupported field type {tp!r}")
