"""Qwen2-VL and Qwen2.5-VL: a vision tower ``visual`` that merges 2x2 patches into one token (through its
``merger``), and a Qwen2 decoder at ``model.language_model``; image and video tokens are routable.

Positions are M-RoPE: transformers computes them from the whole multimodal input (``get_rope_index``, and
``rope_deltas`` for decode steps) before the decoder layers, which receive the text positions and the cos/sin of the
three axes; a routed layer gathers those at its processed rows. cos/sin come as ``[3, B, T, d]`` up to about
transformers 5.15 and merged as ``[B, T, d]`` since; the routed layer gathers either. Decode positions come from
layer 0's cache, which is dense, so a routed model decodes at the positions the dense one does.
"""

from __future__ import annotations

from pmod.core.backbone import BackboneAdapter, language_model, register_backbone

#: Qwen2-7B, the language model of Qwen2-VL-7B and Qwen2.5-VL-7B.
QWEN2_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064)  # fmt: skip


def merged_grid(model: object, inputs: dict) -> tuple[int, int] | None:
    """(rows, cols) of the first image's tokens: its patch grid (``image_grid_thw``) over the merge size."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return None
    merge = getattr(model.config.vision_config, "spatial_merge_size", 2)
    _, rows, cols = (int(v) for v in grid[0])
    return rows // merge, cols // merge


QWEN2_VL = register_backbone(
    BackboneAdapter(
        name="qwen2_vl",
        model_types=("qwen2_vl", "qwen2_5_vl"),
        decoder=language_model,
        routable_token_keys=("image_token_id", "video_token_id"),
        vision_prefixes=("visual",),
        projector_prefixes=("merger",),
        image_grid=merged_grid,
        flops_presets={
            # 1280x720 resized to multiples of 28 px (patch 14, 2x2 merge): 728x1288 -> 26 x 46 tokens.
            "qwen2.5-vl-7b": (QWEN2_7B, 26 * 46, "Qwen2.5-VL-7B, one 1280x720 image (1196 tokens)"),
            # 64 frames at 448x448: 2 frames per temporal patch -> 32 x (448 / 28)^2 tokens.
            "qwen2.5-vl-7b-video": (QWEN2_7B, 32 * 16 * 16, "Qwen2.5-VL-7B, a 64-frame 448x448 video (8192 tokens)"),
        },
    )
)
