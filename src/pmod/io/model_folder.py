"""Open what a user points pmod at: a model folder (routed or plain LLaVA) with its processor, and prompts about
images encoded for it.

:func:`check_model_folder` reads only JSON, so commands can refuse a wrong folder before torch loads; the rest
imports torch and transformers when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.backbone import backbone_for_model_type
from pmod.core.config import MethodConfig, stored_method_config
from pmod.core.errors import UserError
from pmod.core.files import check_complete
from pmod.core.weight_files import check_weight_files

if TYPE_CHECKING:
    import torch
    from PIL import Image

#: The model families that take images (what ``pmod generate`` and ``pmod viz`` can run), for messages.
MULTIMODAL_FAMILIES = "LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL or Qwen3-VL"


#: Files a saved processor leaves in a folder (transformers 5 writes processor_config.json; older versions
#: preprocessor_config.json), and the tokenizer's.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def check_model_folder(
    folder: str | Path, command: str = "pmod", method_config: MethodConfig | None = None
) -> dict[str, Any]:
    """Check that ``folder`` holds a LLaVA model (dense or routed) with its processor, reading JSON and the weight
    files' headers only; returns its config.json. The :class:`UserError` names what is missing or damaged and how
    to fix it. With ``method_config`` (a method to apply on the fly, ``--method``) the folder must be dense."""
    folder = Path(folder)
    check_complete(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json; pass a model folder written by save_pretrained.")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(
            f"{folder}/config.json cannot be read ({err}); pass a folder written by save_pretrained."
        ) from err
    arch = (config.get("architectures") or [""])[0]
    adapter = backbone_for_model_type(config.get("model_type"))
    if adapter is None or not adapter.multimodal or not arch:
        raise UserError(
            f"{folder} holds a {arch or 'model of unknown class'}, not a LLaVA model or another model that takes "
            f"images (dense or routed); {command} needs a {MULTIMODAL_FAMILIES} folder."
        )
    try:
        stored = stored_method_config(config)
    except ValueError as err:
        raise UserError(f"{folder}/config.json: {err}") from err
    if stored is not None and method_config is not None:
        raise UserError(f"{folder} is already a {stored.method} model, so --method {method_config.method} cannot "
                        f"apply; drop --method, or pass the dense base model folder.")  # fmt: skip
    check_weight_files(folder)
    has_processor = any((folder / name).is_file() for name in PROCESSOR_FILES)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    if not (has_processor and has_tokenizer):
        raise UserError(
            f"{folder} has the model but no processor ({' or '.join(PROCESSOR_FILES)} and the tokenizer files); "
            f"save it beside the model: AutoProcessor.from_pretrained(<original folder>).save_pretrained('{folder}')."
        )
    return config


def load_model(
    folder: str | Path, device: str = "auto", command: str = "pmod", method_config: MethodConfig | None = None
) -> tuple[torch.nn.Module, Any]:
    """A routed or a dense model (``pmod.load``) and its processor from a local folder; a dense one converted with
    ``method_config`` when given (a training-free method such as FastV, applied on the fly)."""
    import torch
    import transformers

    from pmod.core.convert import convert, load

    folder = Path(folder)
    check_model_folder(folder, command, method_config)  # refuses method_config for a routed folder
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(folder, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if method_config is not None:
        try:
            convert(model, method_config)
        except ValueError as err:
            raise UserError(f"cannot apply {method_config.method} to {folder}: {err}") from err
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UserError(f"{folder} has no usable processor ({err}); save the processor next to the model.") from err
    return model.to(device).eval(), processor


def build_prompt(processor: Any, prompt: str, n_images: int, n_videos: int = 0) -> str:
    """The model's chat template if the processor has one, otherwise the Vicuna v1 prompt used by LLaVA-1.5."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "video"}] * n_videos + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    from pmod.data.tokenizer import VICUNA_SYSTEM

    if n_videos:
        raise UserError("this model's processor has no chat template, so it cannot place a video; pass images")
    return f"{VICUNA_SYSTEM} USER: " + "<image>\n" * n_images + f"{prompt} ASSISTANT:"


def encode(
    processor: Any,
    model: torch.nn.Module,
    prompts: list[str],
    images: list[list[Image.Image]],
    videos: list[list[list[Image.Image]]] | None = None,
) -> dict:
    """Processor inputs for a batch of prompts (left padding, for generation) on the model's device; each prompt
    with its images and, for models that take them, its videos (each a list of frames)."""
    videos = videos or [[] for _ in prompts]
    texts = [build_prompt(processor, p, len(imgs), len(vids)) for p, imgs, vids in zip(prompts, images, videos)]
    # Images go per prompt (a list of lists), as the processors' own apply_chat_template passes them: LLaVA-OneVision
    # gives each image of a several-image prompt its base view only, and anyres to a prompt's single image.
    nested = [list(imgs) for imgs in images] if any(images) else None
    clips = [clip for vids in videos for clip in vids]
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    extra = {}
    if clips:
        if getattr(processor, "video_processor", None) is None:
            raise UserError("this model's processor takes no video; pass images (--image), or a model that reads "
                            "videos (Qwen-VL, LLaVA-OneVision)")  # fmt: skip
        extra["videos"] = clips
    try:
        inputs = processor(text=texts, images=nested, return_tensors="pt", padding=True, **extra)
    except ImportError as err:  # video processors need torchvision
        raise UserError(f"the processor cannot run here: {' '.join(str(err).split())[:160]}") from err
    limit = model.config.get_text_config().max_position_embeddings
    if inputs["input_ids"].shape[1] >= limit:
        raise UserError(
            f"the prompt is {inputs['input_ids'].shape[1]} tokens with its image(s), but the model's context is "
            f"{limit}; shorten the prompt or use fewer images."
        )
    return inputs.to(model.device)
