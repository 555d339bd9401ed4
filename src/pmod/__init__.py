"""pmod: Mixture-of-Depths multimodal LLMs (p-MoD, vanilla MoD, gamma-MoD, FastV, PyramidDrop, DART,
VisionZip) on Hugging Face transformers.

``pmod.convert(model, config)`` turns a LLaVA / LLaVA-NeXT model (or a Llama-family decoder) into a routed model
with any method config below; ``pmod.load(folder)`` reloads one.

The names below are imported on first use, so that ``import pmod`` (and the ``pmod`` command's ``--help``) does
not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> (module, attribute): the one list of pmod's public API.
EXPORTS: dict[str, tuple[str, str]] = {
    "RoutedCache": ("pmod.core.cache", "RoutedCache"),
    "RoutedStaticCache": ("pmod.core.cache", "RoutedStaticCache"),
    "kv_cache_bytes": ("pmod.core.cache", "kv_cache_bytes"),
    "MethodConfig": ("pmod.core.config", "MethodConfig"),
    "method_names": ("pmod.core.config", "method_names"),
    "convert": ("pmod.core.convert", "convert"),
    "get_method_config": ("pmod.core.convert", "get_method_config"),
    "is_routed_model": ("pmod.core.convert", "is_routed_model"),
    "layer_ratios": ("pmod.core.convert", "layer_ratios"),
    "load": ("pmod.core.convert", "load"),
    "record_routing": ("pmod.core.convert", "record_routing"),
    "routed_layers": ("pmod.core.convert", "routed_layers"),
    "routing_loss": ("pmod.core.convert", "routing_loss"),
    "UserError": ("pmod.core.errors", "UserError"),
    "at_budget": ("pmod.analysis.budget", "at_budget"),
    "set_budget": ("pmod.analysis.budget", "set_budget"),
    "RoutingRecord": ("pmod.core.recording", "RoutingRecord"),
    "set_attention_path": ("pmod.core.routed_layer", "set_attention_path"),
    "DARTConfig": ("pmod.methods", "DARTConfig"),
    "FastVConfig": ("pmod.methods", "FastVConfig"),
    "GammaMoDConfig": ("pmod.methods", "GammaMoDConfig"),
    "MoDConfig": ("pmod.methods", "MoDConfig"),
    "PDropConfig": ("pmod.methods", "PDropConfig"),
    "PModConfig": ("pmod.methods", "PModConfig"),
    "VisionZipConfig": ("pmod.methods", "VisionZipConfig"),
    "import_llava": ("pmod.io.importers.original_llava", "import_llava"),
}

#: Old name -> public name: names that said "pmod" of what serves every method (pmod 0.1's ``pmod_layers``,
#: ``is_pmod_model``, ``get_pmod_config``; 0.2's caches). They resolve for one more release, with a
#: ``DeprecationWarning``, and are not in ``__all__``.
RENAMED: dict[str, str] = {
    "PModCache": "RoutedCache",
    "PModStaticCache": "RoutedStaticCache",
    "pmod_layers": "routed_layers",
    "is_pmod_model": "is_routed_model",
    "get_pmod_config": "get_method_config",
}

#: The public names: the lazy table's (the ``TYPE_CHECKING`` block below repeats them for type checkers and IDEs,
#: which cannot read the table; ``tests/test_public_api.py`` checks that both list the same names).
__all__ = ["__version__", *sorted(EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in RENAMED:
        from pmod.core.deprecation import warn_renamed

        new = RENAMED[name]
        warn_renamed(f"pmod.{name}", f"pmod.{new}")
        return globals()[new] if new in globals() else __getattr__(new)
    if name not in EXPORTS:
        raise AttributeError(f"module 'pmod' has no attribute {name!r}")
    module, attribute = EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see (``X as X``: an explicit re-export)
    from pmod.analysis.budget import at_budget as at_budget
    from pmod.analysis.budget import set_budget as set_budget
    from pmod.core.cache import RoutedCache as RoutedCache
    from pmod.core.cache import RoutedStaticCache as RoutedStaticCache
    from pmod.core.cache import kv_cache_bytes as kv_cache_bytes
    from pmod.core.config import MethodConfig as MethodConfig
    from pmod.core.config import method_names as method_names
    from pmod.core.convert import convert as convert
    from pmod.core.convert import get_method_config as get_method_config
    from pmod.core.convert import is_routed_model as is_routed_model
    from pmod.core.convert import layer_ratios as layer_ratios
    from pmod.core.convert import load as load
    from pmod.core.convert import record_routing as record_routing
    from pmod.core.convert import routed_layers as routed_layers
    from pmod.core.convert import routing_loss as routing_loss
    from pmod.core.errors import UserError as UserError
    from pmod.core.recording import RoutingRecord as RoutingRecord
    from pmod.core.routed_layer import set_attention_path as set_attention_path
    from pmod.io.importers.original_llava import import_llava as import_llava
    from pmod.methods import DARTConfig as DARTConfig
    from pmod.methods import FastVConfig as FastVConfig
    from pmod.methods import GammaMoDConfig as GammaMoDConfig
    from pmod.methods import MoDConfig as MoDConfig
    from pmod.methods import PDropConfig as PDropConfig
    from pmod.methods import PModConfig as PModConfig
    from pmod.methods import VisionZipConfig as VisionZipConfig
