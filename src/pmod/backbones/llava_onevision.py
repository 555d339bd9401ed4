"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): a SigLIP tower, a 2-layer projector and a Qwen2
decoder; images tiled anyres-max (a base view, then up to 9 tiles, pooled when there are many), videos as pooled
frames. Image and video tokens are routable."""

from __future__ import annotations

from pmod.backbones.llava import tower_grid
from pmod.core.backbone import BackboneAdapter, language_model, register_backbone

#: Qwen2-7B, OneVision-7B's language model.
QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)  # fmt: skip

LLAVA_ONEVISION = register_backbone(
    BackboneAdapter(
        name="llava_onevision",
        model_types=("llava_onevision",),
        decoder=language_model,
        routable_token_keys=("image_token_id", "video_token_id"),
        vision_prefixes=("vision_tower",),
        projector_prefixes=("multi_modal_projector",),
        image_grid=tower_grid,
        flops_presets={
            # A 1280x720 image: 729 base tokens (27x27 patches of a 384-px view) + the best anyres grid, unpadded to
            # the image's aspect, pooled to at most 9 tiles' worth, with a newline per row (the processor's count).
            "llava-onevision-7b": (QWEN2_7B, 5967, "LLaVA-OneVision-7B, one 1280x720 image (anyres-max-9)"),
        },
    )
)
