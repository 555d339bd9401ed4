"""Backbone adapters, one module per model family; importing this package registers them with ``pmod.core``."""

from pmod.backbones import decoders, llava, llava_next, llava_onevision, qwen3_vl, qwen_vl

__all__ = ["decoders", "llava", "llava_next", "llava_onevision", "qwen3_vl", "qwen_vl"]
