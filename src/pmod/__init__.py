"""pmod: Mixture-of-Depths multimodal LLMs (p-MoD) on Hugging Face transformers."""

from pmod.cache import PModCache, kv_cache_bytes
from pmod.config import PModConfig
from pmod.convert import (
    convert,
    get_pmod_config,
    is_pmod_model,
    layer_ratios,
    load,
    pmod_layers,
    record_routing,
)

__version__ = "0.1.0"

__all__ = [
    "PModCache",
    "PModConfig",
    "__version__",
    "convert",
    "get_pmod_config",
    "is_pmod_model",
    "kv_cache_bytes",
    "layer_ratios",
    "load",
    "pmod_layers",
    "record_routing",
]
