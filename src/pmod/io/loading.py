"""Open what a user points pmod at: a model folder (routed or plain LLaVA) with its processor, and prompts about
images encoded for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image

from pmod.core.backbone import backbone_for_class_name
from pmod.core.config import stored_method_config
from pmod.core.convert import load
from pmod.core.errors import UserError
from pmod.data.tokenizer import VICUNA_SYSTEM

#: Top-level model classes that take images (what ``pmod generate`` and ``pmod viz`` can run).
MULTIMODAL_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


def load_model(folder: str | Path, device: str = "auto") -> tuple[torch.nn.Module, Any]:
    """Load a routed model (``pmod.load``) or a dense LLaVA model, and its processor, from a local folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; pass a model folder written by save_pretrained.")
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    if arch not in MULTIMODAL_CLASSES or backbone_for_class_name(arch) is None:
        raise UserError(
            f"{folder} holds a {arch or 'model of unknown class'}, not a LLaVA model (dense or routed); "
            f"this needs one of {', '.join(MULTIMODAL_CLASSES)}."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        routed = stored_method_config(config) is not None
    except ValueError as err:
        raise UserError(f"{folder}/config.json: {err}") from err
    if routed:
        model = load(folder, dtype=dtype)
    else:
        model = getattr(transformers, arch).from_pretrained(folder, dtype=dtype)
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} has no usable processor ({err}); save the processor next to the model.") from err
    return model.to(device).eval(), processor


def build_prompt(processor: Any, prompt: str, n_images: int) -> str:
    """The model's chat template if the processor has one, otherwise the Vicuna v1 prompt used by LLaVA-1.5."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{VICUNA_SYSTEM} USER: " + "<image>\n" * n_images + f"{prompt} ASSISTANT:"


def encode(processor: Any, model: torch.nn.Module, prompts: list[str], images: list[list[Image.Image]]) -> dict:
    """Processor inputs for a batch of prompts (left padding, for generation) on the model's device."""
    texts = [build_prompt(processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
    flat = [img for imgs in images for img in imgs]
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    inputs = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    limit = model.config.get_text_config().max_position_embeddings
    if inputs["input_ids"].shape[1] >= limit:
        raise UserError(
            f"the prompt is {inputs['input_ids'].shape[1]} tokens with its image(s), but the model's context is "
            f"{limit}; shorten the prompt or use fewer images."
        )
    return inputs.to(model.device)
