"""Assemble a ``LlavaForConditionalGeneration`` from the parts the original LLaVA recipe starts stage 2 from: a
Llama (Vicuna) folder, a CLIP vision folder and, optionally, the stage-1 projector weights as the original code
saves them (``mm_projector.{0,2}``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pmod.core.errors import UserError

PROJECTOR = "multi_modal_projector"


def assemble_llava(llm: str, vision_tower: str, projector: str | None = None) -> tuple[nn.Module, Any]:
    """A ``LlavaForConditionalGeneration`` from a Llama folder, a CLIP vision folder (features of layer -2, CLS
    dropped) and optionally projector weights (2-layer GELU MLP), with its ``LlavaProcessor``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(llm)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    lm = LlamaForCausalLM.from_pretrained(llm)
    vision = CLIPVisionModel.from_pretrained(vision_tower)
    vcfg: CLIPVisionConfig = vision.config
    try:
        image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    except OSError:  # a bare vision folder: square images at the tower's resolution
        size = vcfg.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=lm.config.to_dict(),
        vision_config=vcfg.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(vision.state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if projector is not None:
        load_projector(model, projector)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def load_projector(model: nn.Module, path: str) -> None:
    """Load projector weights saved by the original LLaVA code (``mm_projector.{0,2}``) or by HF
    (``multi_modal_projector.linear_{1,2}``) into ``model``'s projector."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Original LLaVA names the MLP mm_projector.{0,2}; HF names it multi_modal_projector.linear_{1,2}.
    renamed = {}
    for key, value in state.items():
        tail = key.split("mm_projector.")[-1].split(f"{PROJECTOR}.")[-1]
        tail = tail.replace("0.", "linear_1.", 1) if tail.startswith("0.") else tail
        tail = tail.replace("2.", "linear_2.", 1) if tail.startswith("2.") else tail
        renamed[tail] = value
    projector = getattr(model.model, PROJECTOR)
    missing, unexpected = projector.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise UserError(f"projector weights {path} do not fit: missing {missing}, unexpected {unexpected}")
