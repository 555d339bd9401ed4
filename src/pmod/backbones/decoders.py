"""Bare decoders: Llama (Vicuna), Mistral, Qwen2 and Qwen3, with or without their LM head.

They have no image tokens: routable tokens are passed to the forward as ``vision_mask`` (bool [batch, seq]).
"""

from __future__ import annotations

from pmod.core.backbone import BackboneAdapter, register_backbone, text_decoder

DECODERS = register_backbone(
    BackboneAdapter(name="decoder", model_types=("llama", "mistral", "qwen2", "qwen3"), decoder=text_decoder)
)
