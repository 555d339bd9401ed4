"""Backbone adapters, one module per model family; importing this package registers them with ``pmod.core``."""

from pmod.backbones import decoders, llava

__all__ = ["decoders", "llava"]
