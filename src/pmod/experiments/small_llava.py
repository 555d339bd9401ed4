"""Small LLaVA models built from configs in code, with the synthetic set's word-level tokenizer and processor:
the model the demo trains (and tests load offline). Nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from pmod.data.synth import vocabulary
from pmod.data.tokenizer import build_llava_processor, build_word_tokenizer


def small_llama_config(
    num_layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    attn_implementation: str = "sdpa",
    pad_token_id: int = 0,
    **kwargs: Any,
) -> LlamaConfig:
    """A small Llama config (GQA, SwiGLU MLP of twice the hidden size) whose forward runs in milliseconds."""
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
    )
    config._attn_implementation = attn_implementation
    return config


def small_vision_config(image_size: int, patch_size: int, hidden: int = 32, layers: int = 2) -> dict[str, Any]:
    """A small CLIP vision tower: ``(image_size / patch_size) ** 2`` patches."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )


def build_small_llava(
    num_layers: int = 6,
    image_size: int = 32,
    patch_size: int = 8,
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    chat_template: str | None = None,
    task: str = "shapes",
    patch_local: bool = False,
) -> tuple[LlavaForConditionalGeneration, Any]:
    """A random LLaVA model (CLIP tower, 2-layer MLP projector, Llama decoder) and its processor, with a word-level
    tokenizer over the vocabulary of the synthetic ``task`` (:data:`pmod.data.synth.TASKS`)."""
    tokenizer = build_word_tokenizer(vocabulary(task))
    processor = build_llava_processor(
        tokenizer, image_size=image_size, patch_size=patch_size, chat_template=chat_template
    )
    torch.manual_seed(seed)
    text = small_llama_config(num_layers, hidden=hidden, heads=heads, kv_heads=heads, vocab=len(tokenizer)).to_dict()
    text.update(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=small_vision_config(image_size, patch_size, vision_hidden, vision_layers),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
    )
    model = LlavaForConditionalGeneration(config).eval()
    if patch_local:
        mute_tower_attention(model)
    return model, processor


def tower_attention_outputs(model: nn.Module) -> list[nn.Module]:
    """The output projections of the vision tower's attention layers."""
    tower = model.model.vision_tower
    return [module for name, module in tower.named_modules() if name.endswith("self_attn.out_proj")]


def mute_tower_attention(model: nn.Module) -> None:
    """Zero the tower's attention outputs: each output token then depends on its own patch (and position) only."""
    with torch.no_grad():
        for projection in tower_attention_outputs(model):
            projection.weight.zero_()
            projection.bias.zero_()
