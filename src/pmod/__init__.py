"""pmod: Mixture-of-Depths multimodal LLMs (p-MoD, vanilla MoD, gamma-MoD, FastV) on Hugging Face transformers.

``pmod.convert(model, config)`` turns a LLaVA / LLaVA-NeXT model (or a Llama-family decoder) into a routed model
with any method config below; ``pmod.load(folder)`` reloads one.

The names below are imported on first use, so that ``import pmod`` (and the ``pmod`` command's ``--help``) does
not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: Public name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "PModCache": ("pmod.core.cache", "PModCache"),
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
    "RoutingRecord": ("pmod.core.recording", "RoutingRecord"),
    "set_attention_path": ("pmod.core.routed_layer", "set_attention_path"),
    "DARTConfig": ("pmod.methods", "DARTConfig"),
    "FastVConfig": ("pmod.methods", "FastVConfig"),
    "GammaMoDConfig": ("pmod.methods", "GammaMoDConfig"),
    "MoDConfig": ("pmod.methods", "MoDConfig"),
    "PDropConfig": ("pmod.methods", "PDropConfig"),
    "PModConfig": ("pmod.methods", "PModConfig"),
    "import_llava": ("pmod.io.importers.original_llava", "import_llava"),
    # The names of pmod 0.1, kept: a p-MoD model is a routed model.
    "pmod_layers": ("pmod.core.convert", "routed_layers"),
    "is_pmod_model": ("pmod.core.convert", "is_routed_model"),
    "get_pmod_config": ("pmod.core.convert", "get_method_config"),
}

__all__ = [
    "DARTConfig",
    "FastVConfig",
    "GammaMoDConfig",
    "MethodConfig",
    "MoDConfig",
    "PDropConfig",
    "PModCache",
    "PModConfig",
    "RoutingRecord",
    "UserError",
    "__version__",
    "convert",
    "get_method_config",
    "get_pmod_config",
    "import_llava",
    "is_pmod_model",
    "is_routed_model",
    "kv_cache_bytes",
    "layer_ratios",
    "load",
    "method_names",
    "pmod_layers",
    "record_routing",
    "routed_layers",
    "routing_loss",
    "set_attention_path",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pmod' has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from pmod.core.cache import PModCache, kv_cache_bytes
    from pmod.core.config import MethodConfig, method_names
    from pmod.core.convert import (
        convert,
        get_method_config,
        is_routed_model,
        layer_ratios,
        load,
        record_routing,
        routed_layers,
        routing_loss,
    )
    from pmod.core.errors import UserError
    from pmod.core.recording import RoutingRecord
    from pmod.io.importers.original_llava import import_llava
    from pmod.methods import DARTConfig, FastVConfig, GammaMoDConfig, MoDConfig, PDropConfig, PModConfig

    pmod_layers = routed_layers
    is_pmod_model = is_routed_model
    get_pmod_config = get_method_config
