"""One tiny random model and one batch for every backbone family pmod supports (``supported_model_types()``), built
from configs in code: the method x backbone test matrix's builder, and a quick way to try a method on any family.

Every family's batch has the same shape of content: three left-padded rows of unequal vision-token counts (bare
decoders: 23 contiguous vision tokens, 11 scattered ones, none; LLaVA / NeXT: an image, an image, none; Qwen-VL and
OneVision: an image, two images, a video), and each row again as its own batch, as it would be sent alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pmod.testing import (
    llava_batch,
    llava_next_batch,
    routed_batch,
    tiny_llama,
    tiny_llama_config,
    tiny_llava,
    tiny_llava_next,
)
from pmod.testing.multimodal import onevision_batch, qwen_vl_batch, tiny_llava_onevision, tiny_qwen_vl

#: Bare-decoder rows: (text tokens, vision tokens, scattered among the text).
DECODER_ROWS = [(5, 23, False), (9, 11, True), (4, 0, False)]
#: LLaVA / NeXT rows: (text before, text after) the image, and the image (NeXT: its (height, width); None: none).
LLAVA_TEXT = [(3, 5), (2, 2), (6, 1)]
LLAVA_NEXT_SIZES = [(16, 32), (32, 32), None]
#: Qwen-VL rows: an image, two images, a 4-frame video (in patches); OneVision's the same in pixels / frames.
QWEN_ROWS = [(3, [("image", (4, 4))], 2), (2, [("image", (4, 6)), ("image", (2, 2))], 3),
             (4, [("video", (4, 4, 4))], 1)]  # fmt: skip
ONEVISION_ROWS = [(3, [("image", (64, 64))], 2), (2, [("image", (32, 64)), ("image", (32, 32))], 3),
                  (4, [("video", 4)], 1)]  # fmt: skip
#: The bare decoders, as their model types name them (one config class each, a Llama-sized tiny config).
DECODERS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class TinyInputs:
    """A family's batch (``vision`` marks its vision tokens) and each of its rows as a batch of its own."""

    batch: dict[str, torch.Tensor]
    rows: list[dict[str, torch.Tensor]]
    vision: torch.Tensor


def tiny_decoder(model_type: str, num_layers: int = 6, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """A random bare decoder of ``model_type`` (llama, mistral, qwen2, qwen3) with the tiny Llama's sizes."""
    import transformers

    if model_type == "llama":
        return tiny_llama(num_layers, attn_implementation=attn, seed=seed)
    names = {"mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    settings = tiny_llama_config(num_layers).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        settings.pop(key, None)
    torch.manual_seed(seed)
    config = getattr(transformers, f"{names[model_type]}Config")(**settings)
    model = getattr(transformers, f"{names[model_type]}ForCausalLM")(config)
    model.set_attn_implementation(attn)
    return model.eval()


def tiny_model(model_type: str, num_layers: int = 6, seed: int = 0, attn: str = "sdpa") -> nn.Module:
    """A random tiny dense model of the family ``model_type`` (any of ``supported_model_types()``)."""
    if model_type in DECODERS:
        return tiny_decoder(model_type, num_layers, seed, attn)
    if model_type == "llava":
        return tiny_llava(num_layers, attn_implementation=attn, seed=seed)
    if model_type == "llava_next":
        return tiny_llava_next(num_layers, attn_implementation=attn, seed=seed)
    if model_type == "llava_onevision":
        return tiny_llava_onevision(num_layers, seed=seed, attn=attn)
    if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        return tiny_qwen_vl(model_type, num_layers, seed=seed, attn=attn)
    raise ValueError(f"no tiny model of family {model_type!r}")


def vision_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bool [B, T]: the batch's real vision tokens (a bare decoder's ``vision_mask``; else image / video ids)."""
    real = batch["attention_mask"].bool()
    if "vision_mask" in batch:
        return batch["vision_mask"].bool() & real
    ids = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    return sum((batch["input_ids"] == i) for i in ids if i is not None).bool() & real


def vision_token_ids(model: nn.Module) -> list[int]:
    """The ids a multimodal model reserves for its vision inputs (image, video, their start and end markers)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [i for name in names if (i := getattr(model.config, name, None)) is not None]


def _rows_by_slicing(batch: dict[str, torch.Tensor], image_of_row: Sequence[bool]) -> list[dict[str, torch.Tensor]]:
    """Each row of a LLaVA / NeXT / bare-decoder batch alone: its real tokens and its own image (one at most)."""
    rows, image = [], 0
    for r, has_image in enumerate(image_of_row):
        real = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r : r + 1, real]}
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if "vision_mask" in batch:
            row["vision_mask"] = batch["vision_mask"][r : r + 1, real]
        if has_image:
            row.update({k: batch[k][image : image + 1] for k in ("pixel_values", "image_sizes") if k in batch})
            image += 1
        rows.append(row)
    return rows


def _decoder_inputs(model: nn.Module, padding_side: str, seed: int) -> tuple[dict, list[dict]]:
    ids, am, vm = routed_batch(DECODER_ROWS, padding_side, vocab=model.config.vocab_size, seed=seed)
    batch = {"input_ids": ids, "attention_mask": am, "vision_mask": vm}
    return batch, _rows_by_slicing(batch, [False] * len(DECODER_ROWS))


def _llava_inputs(model: nn.Module, padding_side: str, seed: int) -> tuple[dict, list[dict]]:
    if model.config.model_type == "llava_next":
        batch = llava_next_batch(model, LLAVA_TEXT, LLAVA_NEXT_SIZES, padding_side, seed=seed)
        return batch, _rows_by_slicing(batch, [size is not None for size in LLAVA_NEXT_SIZES])
    images = [True, True, False]
    batch = llava_batch(model, LLAVA_TEXT, images, padding_side, seed=seed)
    return batch, _rows_by_slicing(batch, images)


def _per_row_inputs(make: Callable, rows: list) -> Callable:
    def build(model: nn.Module, padding_side: str, seed: int) -> tuple[dict, list[dict]]:
        alone = [make(model, [row], padding_side, seed=seed, first_row=r) for r, row in enumerate(rows)]
        return make(model, rows, padding_side, seed=seed), alone

    return build


_INPUTS = {
    **dict.fromkeys(DECODERS, _decoder_inputs),
    "llava": _llava_inputs,
    "llava_next": _llava_inputs,
    "llava_onevision": _per_row_inputs(onevision_batch, ONEVISION_ROWS),
    **dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), _per_row_inputs(qwen_vl_batch, QWEN_ROWS)),
}


def tiny_inputs(model: nn.Module, padding_side: str = "left", seed: int = 0) -> TinyInputs:
    """The family's three-row batch for ``model`` (a :func:`tiny_model`, dense or converted) and each row alone."""
    batch, rows = _INPUTS[model.config.model_type](model, padding_side, seed)
    return TinyInputs(batch, rows, vision_tokens(model, batch))
