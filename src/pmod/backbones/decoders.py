"""Bare Llama-family decoders: Llama (Vicuna), Mistral and Qwen2, with or without their LM head.

They have no image tokens: routable tokens are passed to the forward as ``vision_mask`` (bool [batch, seq]).
"""

from __future__ import annotations

from pmod.core.backbone import BackboneAdapter, register_backbone

CAUSAL_LM = register_backbone(
    BackboneAdapter(
        name="decoder",
        model_classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
        decoder=lambda model: model.model,
    )
)
BASE_MODEL = register_backbone(
    BackboneAdapter(
        name="decoder-base",
        model_classes=("LlamaModel", "MistralModel", "Qwen2Model"),
        decoder=lambda model: model,
    )
)
