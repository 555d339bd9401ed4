"""pmod: Mixture-of-Depths multimodal LLMs (p-MoD, vanilla MoD, gamma-MoD, FastV) on Hugging Face transformers.

``pmod.convert(model, config)`` turns a LLaVA / LLaVA-NeXT model (or a Llama-family decoder) into a routed model
with any method config below; ``pmod.load(folder)`` reloads one.
"""

from pmod import backbones as _backbones  # noqa: F401  (registers the model families)
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
from pmod.methods import FastVConfig, GammaMoDConfig, MoDConfig, PModConfig

__version__ = "0.2.0"

# The names of pmod 0.1, kept: a p-MoD model is a routed model.
pmod_layers = routed_layers
is_pmod_model = is_routed_model
get_pmod_config = get_method_config

__all__ = [
    "FastVConfig",
    "GammaMoDConfig",
    "MethodConfig",
    "MoDConfig",
    "PModCache",
    "PModConfig",
    "RoutingRecord",
    "UserError",
    "__version__",
    "convert",
    "get_method_config",
    "get_pmod_config",
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
]
