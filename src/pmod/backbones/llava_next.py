"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's parts with anyres tiling (a base view, then the
tiles of the best grid with a newline token per row); the image tokens are routable."""

from __future__ import annotations

from pmod.backbones.llava import VICUNA_7B, VICUNA_13B, tower_grid
from pmod.core.backbone import BackboneAdapter, language_model, register_backbone

LLAVA_NEXT = register_backbone(
    BackboneAdapter(
        name="llava_next",
        model_types=("llava_next",),
        decoder=language_model,
        routable_token_keys=("image_token_id",),
        vision_prefixes=("vision_tower",),
        projector_prefixes=("multi_modal_projector",),
        image_grid=tower_grid,
        flops_presets={
            "llava-next-7b": (VICUNA_7B, 2880, "LLaVA-NeXT on Vicuna-7B, up to 2880 vision tokens (AnyRes, 5x576)"),
            "llava-next-13b": (VICUNA_13B, 2880, "LLaVA-NeXT on Vicuna-13B, up to 2880 vision tokens"),
        },
    )
)
