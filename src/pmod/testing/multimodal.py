"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL and LLaVA-OneVision models and batches with images, several images and
videos per row, built from configs in code (no downloads, no processor)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

IMAGE_ID, VIDEO_ID, START_ID, END_ID, PAD_ID = 151, 152, 153, 154, 0
VOCAB = 200
QwenKind = Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
#: One vision item of a row: ("image", (rows, cols)) in patches, or ("video", (frames, rows, cols)); for OneVision
#: ("image", (height, width)) in pixels, or ("video", frames).
Item = tuple[str, tuple[int, ...] | int]
#: A row: text tokens before, the vision items (each followed by one text token), text tokens after.
Row = tuple[int, Sequence[Item], int]


def _text(num_layers: int, **extra: object) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=4096, pad_token_id=PAD_ID,
                **extra)  # fmt: skip


def tiny_qwen_vl(kind: QwenKind = "qwen2_5_vl", num_layers: int = 6, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """A random Qwen-VL model: a 2-3 layer tower with 14/16-px patches merged 2x2, a 64-wide decoder."""
    import transformers

    torch.manual_seed(seed)
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
               vision_end_token_id=END_ID)  # fmt: skip
    if kind == "qwen2_vl":
        config = transformers.Qwen2VLConfig(
            text_config=_text(num_layers, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14),
            **ids,
        )
        cls = transformers.Qwen2VLForConditionalGeneration
    elif kind == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=_text(num_layers, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                               patch_size=14, window_size=56, fullatt_block_indexes=[1]),  # fmt: skip
            **ids,
        )
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        config = transformers.Qwen3VLConfig(
            text_config=_text(num_layers, head_dim=16, rope_scaling=rope),
            vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                               patch_size=16, deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=64),
            **ids,
        )  # fmt: skip
        cls = transformers.Qwen3VLForConditionalGeneration
    model = cls(config)
    model.set_attn_implementation(attn)
    return model.eval()


def _row_generator(seed: int, row: int) -> torch.Generator:
    # One generator per row, so that a row built alone (``first_row``) gets the same tokens and pixels as in a batch.
    return torch.Generator().manual_seed(seed * 10_000 + row)


def qwen_vl_batch(
    model: nn.Module, rows: Sequence[Row], padding_side: str = "left", seed: int = 0, first_row: int = 0
) -> dict:
    """Inputs of a Qwen-VL model: rows of text around images / videos, padded; ``mm_token_type_ids`` marks them.

    Images are (rows, cols) patch grids (multiples of the merge size); videos (frames, rows, cols) with an even
    number of frames (two per temporal patch). Qwen3-VL gets one vision block per temporal group, as its processor
    writes them. Row i's content depends only on ``seed`` and ``first_row + i``.
    """
    vision = model.config.vision_config
    merge, patch, temporal = vision.spatial_merge_size, vision.patch_size, vision.temporal_patch_size
    width = 3 * temporal * patch * patch
    per_group = model.config.model_type == "qwen3_vl"
    seqs, pixels, grids, video_pixels, video_grids = [], [], [], [], []
    for r, (before, items, after) in enumerate(rows):
        g = _row_generator(seed, first_row + r)
        seq = torch.randint(5, 100, (before,), generator=g).tolist()
        for kind, shape in items:
            if kind == "image":
                h, w = shape
                grids.append([1, h, w])
                pixels.append(torch.randn(h * w, width, generator=g))
                seq += [START_ID] + [IMAGE_ID] * (h * w // merge**2) + [END_ID]
            else:
                frames, h, w = shape
                t = frames // temporal
                video_grids.append([t, h, w])
                video_pixels.append(torch.randn(t * h * w, width, generator=g))
                if per_group:
                    blocks = [[START_ID] + [VIDEO_ID] * (h * w // merge**2) + [END_ID] for _ in range(t)]
                else:
                    blocks = [[START_ID] + [VIDEO_ID] * (t * h * w // merge**2) + [END_ID]]
                seq += [token for block in blocks for token in block]
            seq += torch.randint(5, 100, (1,), generator=g).tolist()
        seqs.append(seq + torch.randint(5, 100, (after,), generator=g).tolist())
    batch = _pad(seqs, padding_side)
    batch["mm_token_type_ids"] = ((batch["input_ids"] == IMAGE_ID).int() + 2 * (batch["input_ids"] == VIDEO_ID).int())
    if pixels:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(pixels), torch.tensor(grids)
    if video_pixels:
        batch["pixel_values_videos"], batch["video_grid_thw"] = torch.cat(video_pixels), torch.tensor(video_grids)
    return batch


def tiny_llava_onevision(num_layers: int = 6, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """A random LLaVA-OneVision model: a 2-layer SigLIP tower on 32-px tiles of 8-px patches (16 tokens a tile),
    anyres-max-9 over 32/64-px grids, a 64-wide Qwen2 decoder."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(num_layers)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_feature_layer=-1,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
    )  # fmt: skip
    model = transformers.LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation(attn)
    return model.eval()


def onevision_batch(
    model: nn.Module, rows: Sequence[Row], padding_side: str = "left", seed: int = 0, first_row: int = 0
) -> dict:
    """Inputs of a LLaVA-OneVision model: images given as (height, width) in pixels, videos as a frame count; the
    number of tokens of each is what the model's own feature code gives. Row i's content depends only on ``seed``
    and ``first_row + i``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    config = model.config
    side = config.vision_config.image_size
    images, sizes, videos = [], [], []
    generators = [_row_generator(seed, first_row + r) for r in range(len(rows))]
    for (_, items, _), g in zip(rows, generators):
        for kind, shape in items:
            if kind == "image":
                n = image_size_to_num_patches(shape, config.image_grid_pinpoints, side)
                images.append(torch.randn(n, 3, side, side, generator=g))
                sizes.append(list(shape))
            else:
                videos.append(torch.randn(shape, 3, side, side, generator=g))
    batch: dict = {}
    image_counts: list[int] = []
    video_counts: list[int] = []
    with torch.no_grad():
        if images:
            most = max(p.shape[0] for p in images)
            pixel_values = torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in images])
            batch["pixel_values"], batch["image_sizes"] = pixel_values, torch.tensor(sizes)
            feats = model.model.get_image_features(pixel_values, batch["image_sizes"]).pooler_output
            image_counts = [f.shape[0] for f in feats]
        if videos:
            batch["pixel_values_videos"] = torch.stack(videos)
            # Each frame's patch grid is pooled to half its side (rounded up), then one newline ends the video.
            # Counted here: where the newline is appended moved between transformers releases.
            grid = math.ceil(side // config.vision_config.patch_size / 2)
            video_counts = [v.shape[0] * grid * grid + 1 for v in videos]
    image_it, video_it = iter(image_counts), iter(video_counts)
    seqs = []
    for (before, items, after), g in zip(rows, generators):
        seq = torch.randint(5, 100, (before,), generator=g).tolist()
        for kind, _ in items:
            seq += [IMAGE_ID] * next(image_it) if kind == "image" else [VIDEO_ID] * next(video_it)
            seq += torch.randint(5, 100, (1,), generator=g).tolist()
        seqs.append(seq + torch.randint(5, 100, (after,), generator=g).tolist())
    return {**_pad(seqs, padding_side), **batch}


def _pad(seqs: list[list[int]], padding_side: str) -> dict[str, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for r, seq in enumerate(seqs):
        start = length - len(seq) if padding_side == "left" else 0
        ids[r, start : start + len(seq)] = torch.tensor(seq)
        mask[r, start : start + len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}
