"""Every place pmod adapts to a transformers version, in one module.

pmod supports transformers 5.5 to 5.25 (the lower bound runs in CI). What moved between those versions, and how
pmod reads it:

* the KV cache's keyword: ``cache`` from 5.24 (``past_key_values`` a deprecated alias until 5.40), before only
  ``past_key_values`` (:data:`CACHE_NAME`, :func:`pop_cache_keyword`);
* ``DynamicCache.crop``: from 5.24 the number of tokens to remove (negative), before the length to keep
  (:data:`CROP_TAKES_COUNT`);
* M-RoPE (Qwen2-VL, Qwen2.5-VL): up to ~5.15 the rotary module returns cos/sin ``[3, B, T, d]`` and the attention
  splits them by ``mrope_section``; later ``[B, T, d]`` already merged (:func:`has_rope_axis`, :func:`rotary`);
* the images of a multimodal forward: ``pixel_values`` / ``pixel_values_videos``, or from 5.2x the encoder outputs
  ``generate`` computed beforehand (``mm_encoder_outputs``) (:func:`has_vision_inputs`);
* the mask ``generate`` builds for a static cache: a 4-D tensor, or per layer type a dict of them (models whose
  config lists ``layer_types``) (:func:`full_attention_mask`);
* the attention implementation a layer runs: ``config._attn_implementation`` (:func:`attention_implementation`).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import fields
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

#: What transformers calls the KV cache in model inputs and outputs.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

#: Whether ``DynamicCache.crop`` takes the number of tokens to remove (negative) rather than the length to keep.
CROP_TAKES_COUNT = "tokens_to_remove" in inspect.signature(DynamicCache.crop).parameters


def pop_cache_keyword(kwargs: dict[str, Any], past_key_values: Any) -> tuple[str, Any]:
    """The name a decoder layer got its cache under (``cache`` or ``past_key_values``) and the cache itself; the
    cache is removed from ``kwargs``, so it can be handed on under the same name."""
    if "cache" in kwargs:
        return "cache", kwargs.pop("cache")
    return "past_key_values", past_key_values


#: Keyword arguments that carry images or videos (or their encoded features) into a multimodal model's forward.
VISION_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


def has_vision_inputs(kwargs: dict[str, Any]) -> bool:
    """Whether a model call's keyword arguments carry images or videos (see :data:`VISION_INPUTS`)."""
    return any(kwargs.get(name) is not None for name in VISION_INPUTS)


def full_attention_mask(mask: Any) -> Any:
    """The full-attention mask of what a model's forward got as ``attention_mask``: the tensor itself, or the
    ``"full_attention"`` entry of the per-layer-type dict ``generate`` builds for a static cache (some releases)."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next(iter(mask.values()), None))
    return mask


def attention_implementation(layer: nn.Module) -> str:
    """The attention implementation a decoder layer runs (``"sdpa"``, ``"eager"``, ``"flash_attention_2"``...)."""
    return layer.self_attn.config._attn_implementation


def has_rope_axis(t: torch.Tensor, per_token_dims: int) -> bool:
    """Whether RoPE cos/sin (``per_token_dims=1``) or position ids (``0``) carry M-RoPE's leading axis
    (``[3, B, T, d]`` / ``[3 or 4, B, T]``) besides batch and sequence."""
    return t.dim() != 2 + per_token_dims


def rotary(module: nn.Module) -> Any:
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the attention module's own modeling file (Llama, Mistral,
    Qwen2, ...). Qwen2-VL / Qwen2.5-VL up to transformers ~5.15 apply M-RoPE in the attention instead (cos/sin
    ``[3, B, T, d]`` split by ``mrope_section``): that function, with the section bound."""
    module_file = sys.modules[type(module).__module__]
    fn = getattr(module_file, "apply_rotary_pos_emb", None)
    if fn is not None:
        return fn
    multimodal = getattr(module_file, "apply_multimodal_rotary_pos_emb", None)
    config = getattr(module, "config", None)
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}) if config else {}
    if multimodal is not None and "mrope_section" in rope:
        return lambda q, k, cos, sin: multimodal(q, k, cos, sin, rope["mrope_section"])
    raise TypeError(f"{type(module).__name__} has no apply_rotary_pos_emb in its module; pmod needs RoPE q/k.")
