"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower (``vision_tower``), a 2-layer MLP projector
(``multi_modal_projector``) and a Llama-family decoder (``model.language_model``); the image tokens are routable."""

from __future__ import annotations

from pmod.core.backbone import BackboneAdapter, VisionTokenPath, language_model, register_backbone

#: Vicuna-7B and -13B, the LLaVA-1.5 / NeXT language models.
VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000)  # fmt: skip
VICUNA_13B = dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                  intermediate_size=13824, vocab_size=32000)  # fmt: skip


def tower_grid(model: object, inputs: dict) -> tuple[int, int]:
    """(rows, cols) of the first image's tokens: the tower's patch grid (LLaVA-NeXT: its base view, which comes
    first)."""
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    return side, side


def vision_token_path(model: object) -> VisionTokenPath:
    """The tower's encoder layers, the feature layer and the projector of a LLaVA-1.5 model; ``has_cls`` for a CLIP
    tower (its first token is [CLS]; the ``default`` feature strategy drops it before the projector)."""
    inner = getattr(model, "model", model)
    config, vision = model.config, model.config.vision_config
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    encoder = getattr(tower, "encoder", None)
    patches = (vision.image_size // vision.patch_size) ** 2
    return VisionTokenPath(
        encoder_layers=getattr(encoder, "layers", None),
        feature_layer=config.vision_feature_layer,
        projector=inner.multi_modal_projector,
        image_token_id=config.image_token_id,
        tokens_per_image=patches + (config.vision_feature_select_strategy == "full"),
        has_cls=vision.model_type == "clip_vision_model" and encoder is not None,
    )


LLAVA = register_backbone(
    BackboneAdapter(
        name="llava",
        model_types=("llava",),
        decoder=language_model,
        routable_token_keys=("image_token_id",),
        vision_prefixes=("vision_tower",),
        projector_prefixes=("multi_modal_projector",),
        image_grid=tower_grid,
        vision_token_path=vision_token_path,
        flops_presets={
            "llava-1.5-7b": (VICUNA_7B, 576, "LLaVA-1.5 on Vicuna-7B, 576 vision tokens (336px, 24x24 patches)"),
            "llava-1.5-13b": (VICUNA_13B, 576, "LLaVA-1.5 on Vicuna-13B, 576 vision tokens"),
        },
    )
)
