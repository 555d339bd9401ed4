"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA-1.5's parts with anyres tiling (a base view, then the
tiles of the best grid with a newline token per row); the image tokens are routable."""

from __future__ import annotations

import dataclasses
from typing import Any

from pmod.backbones.llava import VICUNA_7B, VICUNA_13B, tower_grid
from pmod.backbones.llava import vision_token_path as llava_vision_token_path
from pmod.core.backbone import BackboneAdapter, VisionTokenPath, language_model, register_backbone


def image_views(config: Any, image_sizes: Any) -> list[tuple[int, int, int, int]]:
    """(views, placeholders, tile rows, tile cols) of each image: the base view and the tiles of its anyres grid;
    the placeholders as the processor counts them (the base view's patches, then the tiles' patches unpadded to the
    image's aspect with a newline per row), read off transformers' own functions."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = config.vision_config.image_size
    patches = side // config.vision_config.patch_size
    out = []
    for size in image_sizes.tolist() if hasattr(image_sizes, "tolist") else image_sizes:
        rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, side)
        height, width = unpad_image(torch.empty(0, rows * patches, cols * patches), size).shape[1:]
        out.append((1 + rows * cols, patches * patches + height * (width + 1), rows, cols))
    return out


def vision_token_path(model: Any) -> VisionTokenPath:
    """LLaVA-1.5's path, with the anyres views of each image and the module that packs them."""
    path = llava_vision_token_path(model)
    return dataclasses.replace(path, views=lambda sizes: image_views(model.config, sizes),
                               packer=getattr(model, "model", model))  # fmt: skip


LLAVA_NEXT = register_backbone(
    BackboneAdapter(
        name="llava_next",
        model_types=("llava_next",),
        decoder=language_model,
        routable_token_keys=("image_token_id",),
        vision_prefixes=("vision_tower",),
        projector_prefixes=("multi_modal_projector",),
        image_grid=tower_grid,
        vision_token_path=vision_token_path,
        flops_presets={
            "llava-next-7b": (VICUNA_7B, 2880, "LLaVA-NeXT on Vicuna-7B, up to 2880 vision tokens (AnyRes, 5x576)"),
            "llava-next-13b": (VICUNA_13B, 2880, "LLaVA-NeXT on Vicuna-13B, up to 2880 vision tokens"),
        },
    )
)
