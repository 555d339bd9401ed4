"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres).

The language model is ``model.model.language_model`` (a Llama-family decoder); the routable tokens are the image
tokens (``config.image_token_id``); the CLIP tower is ``model.vision_tower`` and the MLP projector
``model.multi_modal_projector``.
"""

from __future__ import annotations

from pmod.core.backbone import BackboneAdapter, register_backbone

LLAVA = register_backbone(
    BackboneAdapter(
        name="llava",
        model_classes=("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"),
        decoder=lambda model: model.model.language_model,
        routable_token_keys=("image_token_id", "video_token_id"),
        vision_prefixes=("model.vision_tower",),
        projector_prefixes=("model.multi_modal_projector",),
    )
)
