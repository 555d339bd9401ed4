"""Qwen3-VL: the Qwen2.5-VL layout (``visual`` tower with a merger, decoder at ``model.language_model``) with a Qwen3
decoder, interleaved M-RoPE merged inside the rotary module, and deepstack.

Deepstack adds visual features of intermediate tower layers to the hidden states after decoder layers 0-2, at the
vision rows. It happens in the text model, outside the decoder layers, on the full-length hidden states a routed
layer hands back: a token the layer skipped gets its features at its own row like a processed one. So layers 1-2
may be routed (layer 0 stays dense, as everywhere); ``tests/test_backbones.py`` checks the features land on the
right rows.
"""

from __future__ import annotations

from pmod.backbones.qwen_vl import merged_grid
from pmod.core.backbone import BackboneAdapter, language_model, register_backbone

#: Qwen3-8B, the language model of Qwen3-VL-8B.
QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, intermediate_size=12288, vocab_size=151936)  # fmt: skip

QWEN3_VL = register_backbone(
    BackboneAdapter(
        name="qwen3_vl",
        model_types=("qwen3_vl",),
        decoder=language_model,
        routable_token_keys=("image_token_id", "video_token_id"),
        vision_prefixes=("visual",),
        projector_prefixes=("merger", "deepstack_merger_list"),
        image_grid=merged_grid,
        flops_presets={"qwen3-vl-8b": (QWEN3_8B, 26 * 46, "Qwen3-VL-8B, one 1280x720 image (1196 tokens)")},
    )
)
