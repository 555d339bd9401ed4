"""``--backbone qwen2.5-vl-7b``: the benchmarks on a Qwen2.5-VL model whose decoder has the 7B's shape, fed a video.

What runs: ``Qwen2_5_VLForConditionalGeneration`` with random weights, the Qwen2.5-VL-7B decoder's width (hidden
3584, 28 query / 4 KV heads of 128, SwiGLU 18944, vocab 152064) and M-RoPE, a one-block vision tower (the tower is
the same for dense and p-MoD; a small one keeps the measurement on the decoder), and a 64-frame 448x448 video:
two frames per temporal patch, 2x2 merged 14-px patches, 32 x 16 x 16 = 8192 video tokens.

Reduced depth: the 7B has 28 decoder layers, which do not fit a small machine's memory (fp32) or time. By default 4
layers run, and each takes the ratio that the paper's PRD schedule gives the layer at the same relative depth of the
28-layer model (layers 0, 9, 18, 27: dense, 0.75, 0.25, 0.15; mean retention 0.5375, as at full depth). Results
say so (``reduced_depth``); their analytic ratio is that of the layers that ran. ``--layers 28`` runs the full depth
(e.g. on a GPU).

The dense and the p-MoD model share their weight tensors (the p-MoD copy adds routers only), which halves memory;
both run in inference mode only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import pmod
from pmod import PModConfig
from pmod.testing import randomize_routers
from pmod.testing.multimodal import END_ID, IMAGE_ID, START_ID, VIDEO_ID, qwen_vl_batch

NAME = "qwen2.5-vl-7b"
FULL_DEPTH = 28
PATCH, MERGE, TEMPORAL = 14, 2, 2

FULL: dict[str, Any] = dict(
    layers=4, hidden=3584, heads=28, kv_heads=4, intermediate=18944, vocab=152064, n_text=64, frames=64,
    frame_size=448, warmup=0, reps=2,
)  # fmt: skip
QUICK: dict[str, Any] = dict(
    layers=2, hidden=256, heads=4, kv_heads=2, intermediate=704, vocab=4096, n_text=64, frames=8, frame_size=224,
    warmup=1, reps=2,
)  # fmt: skip


def vision_tokens(frames: int, frame_size: int) -> int:
    """Video tokens of ``frames`` frames of ``frame_size`` px square (a multiple of 28 px, an even frame count)."""
    if frames % TEMPORAL or frame_size % (PATCH * MERGE):
        raise SystemExit(f"--frames must be even and --frame-size a multiple of {PATCH * MERGE} (got {frames}, "
                         f"{frame_size}).")  # fmt: skip
    return frames // TEMPORAL * (frame_size // (PATCH * MERGE)) ** 2


def sampled_ratios(layers: int, full_depth: int = FULL_DEPTH) -> list[float | None]:
    """The PRD ratios of ``full_depth`` layers, taken at ``layers`` evenly spaced depths (all of them if equal)."""
    full = PModConfig().layer_ratios(full_depth)
    if layers >= full_depth:
        return full
    return [full[i] for i in _picked(layers, full_depth)]


def _picked(layers: int, full_depth: int) -> list[int]:
    # first and last layer included (layer 0 must stay dense), the rest evenly spaced
    return [round(i * (full_depth - 1) / max(layers - 1, 1)) for i in range(layers)]


def method_config(layers: int) -> PModConfig:
    return PModConfig(schedule="explicit", ratios=sampled_ratios(layers))


def reduced_depth(layers: int) -> str | None:
    if layers >= FULL_DEPTH:
        return None
    picked = _picked(layers, FULL_DEPTH)
    return f"{layers} of {FULL_DEPTH} layers, with the PRD ratios of layers {picked} of the {FULL_DEPTH}-layer model"


def build_models(shape: Any, device: str, dtype: torch.dtype, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random dense Qwen2.5-VL of the given decoder shape and a p-MoD copy sharing its weights (random routers)."""
    torch.manual_seed(seed)
    head_dim = shape.hidden // shape.heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]  # Qwen2.5-VL's [16, 24, 24] at head_dim 128
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
            max_position_embeddings=32768, rope_scaling={"type": "mrope", "mrope_section": section}, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=shape.hidden,
                           patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           fullatt_block_indexes=[0]),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID,
    )  # fmt: skip
    with torch.device(device):  # made where it runs: a 7B model built on the host first takes minutes
        dense = Qwen2_5_VLForConditionalGeneration(config).to(dtype=dtype).eval()
    shared = {id(p): p for p in dense.parameters()}
    routed = pmod.convert(copy.deepcopy(dense, memo=shared), method_config(shape.layers))
    randomize_routers(routed, seed=seed)
    return dense, routed.to(device=device, dtype=dtype).eval()


def video_inputs(model: torch.nn.Module, batch: int, frames: int, frame_size: int, n_text: int, device: str) -> dict:
    """``batch`` equal rows: half the text, one video, the rest of the text (``n_text`` text tokens in all, counting
    the vision start/end markers), as the processor lays them out."""
    grid = frame_size // PATCH
    before = n_text // 2
    row = (before, [("video", (frames, grid, grid))], n_text - before - 3)  # start, end and one token after
    inputs = qwen_vl_batch(model, [row] * batch)
    dtype = next(model.parameters()).dtype
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
