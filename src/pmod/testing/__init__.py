"""Tiny models and batches built from configs in code, for tests, examples and checks (no downloads); the
independent reference forwards of the routing methods are in :mod:`pmod.testing.reference`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from pmod.core.config import MethodConfig
from pmod.core.deprecation import warn_renamed
from pmod.experiments.small_llava import build_small_llava, small_llama_config, small_vision_config

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


#: A small Llama config (GQA, SwiGLU) whose forward runs in milliseconds on a CPU (padding id ``PAD_TOKEN_ID``).
tiny_llama_config = small_llama_config


def tiny_llava(
    num_layers: int = 6, image_size: int = 32, patch_size: int = 4, attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaForConditionalGeneration:
    """A random LLaVA-1.5-shaped model: CLIP tower, 2-layer MLP projector, Llama decoder.

    Each image gives ``(image_size / patch_size) ** 2`` vision tokens (64 with the defaults).
    """
    torch.manual_seed(seed)
    config = LlavaConfig(
        text_config=tiny_llama_config(num_layers).to_dict(),
        vision_config=small_vision_config(image_size, patch_size),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_llava_next(
    num_layers: int = 6, image_size: int = 16, patch_size: int = 4, attn_implementation: str = "sdpa", seed: int = 0
) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT-shaped model (anyres tiles, newline tokens): vision-token counts depend on image size."""
    torch.manual_seed(seed)
    s = image_size
    config = LlavaNextConfig(
        text_config=tiny_llama_config(num_layers).to_dict(),
        vision_config=small_vision_config(image_size, patch_size),
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config._attn_implementation = attn_implementation
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def tiny_llama(num_layers: int = 6, attn_implementation: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(num_layers, attn_implementation=attn_implementation))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def _assemble(rows: list[tuple[int, int, int]], padding_side: str, vocab: int, generator: torch.Generator):
    """input_ids and attention_mask for rows of (text before image, vision tokens, text after)."""
    lengths = [a + v + b for a, v, b in rows]
    seq = max(lengths)
    ids = torch.full((len(rows), seq), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for r, (a, v, b) in enumerate(rows):
        text = torch.randint(4, vocab, (a + b,), generator=generator)
        row = torch.cat([text[:a], torch.full((v,), IMAGE_TOKEN_ID), text[a:]])
        start = seq - len(row) if padding_side == "left" else 0
        ids[r, start : start + len(row)] = row
        mask[r, start : start + len(row)] = 1
    return ids, mask


def llava_batch(
    model: LlavaForConditionalGeneration,
    text: list[tuple[int, int]],
    images: list[bool],
    padding_side: str = "right",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A LLaVA batch: row r has ``text[r] = (before, after)`` text tokens around one image if ``images[r]``."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    n_vis = (vc.image_size // vc.patch_size) ** 2
    rows = [(a, n_vis if img else 0, b) for (a, b), img in zip(text, images)]
    ids, mask = _assemble(rows, padding_side, model.config.text_config.vocab_size, g)
    batch = {"input_ids": ids, "attention_mask": mask}
    n_images = sum(images)
    if n_images:
        batch["pixel_values"] = torch.randn(n_images, 3, vc.image_size, vc.image_size, generator=g)
    return batch


def llava_next_batch(
    model: LlavaNextForConditionalGeneration,
    text: list[tuple[int, int]],
    image_sizes: list[tuple[int, int] | None],
    padding_side: str = "right",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A LLaVA-NeXT batch; ``image_sizes[r]`` is (height, width) of row r's image or None for no image.

    The number of image tokens per row is what the model's anyres feature packing produces for that size.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    s = cfg.vision_config.image_size
    sizes = [size for size in image_sizes if size is not None]
    pixel_values = image_sizes_t = None
    counts: list[int] = []
    if sizes:
        n_patches = [image_size_to_num_patches(size, cfg.image_grid_pinpoints, s) for size in sizes]
        pixel_values = torch.zeros(len(sizes), max(n_patches), 3, s, s)
        for i, n in enumerate(n_patches):
            pixel_values[i, :n] = torch.randn(n, 3, s, s, generator=g)
        image_sizes_t = torch.tensor(sizes)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values, image_sizes_t).pooler_output
        counts = [f.shape[0] for f in feats]
    it = iter(counts)
    rows = [(a, next(it) if size is not None else 0, b) for (a, b), size in zip(text, image_sizes)]
    ids, mask = _assemble(rows, padding_side, cfg.text_config.vocab_size, g)
    batch = {"input_ids": ids, "attention_mask": mask}
    if sizes:
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = image_sizes_t
    return batch


def randomize_routers(model: torch.nn.Module, scale: float = 1.0, seed: int = 0) -> None:
    """Give every router of a routed model random non-zero weights (a trained-looking router for tests): the
    per-layer routers of p-MoD / MoD and gamma-MoD's shared router."""
    from pmod.core.backbone import backbone_for
    from pmod.core.convert import routed_layers
    from pmod.methods.gamma_mod import ROUTER_NAME

    g = torch.Generator().manual_seed(seed)
    routers = [layer.router for layer in routed_layers(model).values() if hasattr(layer, "router")]
    shared = getattr(backbone_for(model).decoder(model), ROUTER_NAME, None)
    if shared is not None:
        routers.append(shared)
    with torch.no_grad():
        for router in routers:
            w = router.weight
            w.copy_(torch.randn(w.shape, generator=g) * scale / w.shape[-1] ** 0.5)
            if router.bias is not None:
                router.bias.copy_(torch.randn(router.bias.shape, generator=g) * 0.1)


def tiny_llava_folder(
    folder: str,
    num_layers: int = 6,
    image_size: int = 32,
    patch_size: int = 8,
    method_config: MethodConfig | None = None,
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    chat_template: str | None = None,
    pmod_config: MethodConfig | None = None,
) -> str:
    """Save a small random LLaVA model with a word-level tokenizer (the synthetic set's vocabulary) and processor
    to ``folder``; it loads offline with ``from_pretrained`` / ``pmod.load``.

    With ``method_config`` (any method config) the model is converted (random non-zero routers) before saving.
    ``pmod_config`` is its deprecated name (it warns).
    """
    from pmod.core.convert import convert

    if pmod_config is not None:
        if method_config is not None:
            raise TypeError("tiny_llava_folder takes method_config= (pmod_config= is its old name), not both")
        warn_renamed("tiny_llava_folder(pmod_config=...)", "method_config=")
        method_config = pmod_config

    model, processor = build_small_llava(
        num_layers, image_size, patch_size, seed, hidden, heads, vision_hidden, vision_layers, vision_feature_layer,
        chat_template,
    )  # fmt: skip
    if method_config is not None:
        convert(model, method_config)
        randomize_routers(model, scale=3.0, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def routed_batch(
    rows: Sequence[tuple[int, int, bool]], padding_side: str, vocab: int = 128, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bare-decoder batch: ``rows[r] = (n_text, n_vision, interleave)``; returns ids, attention mask, vision mask.

    Without ``interleave`` a row is 2 text tokens, the image block, then the rest of the text (LLaVA's layout);
    with it the vision tokens are scattered among the text.
    """
    g = torch.Generator().manual_seed(seed)
    seq = max(t + v for t, v, _ in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    am = torch.zeros(len(rows), seq, dtype=torch.long)
    vm = torch.zeros(len(rows), seq, dtype=torch.bool)
    for r, (t, v, inter) in enumerate(rows):
        kinds = torch.tensor([1] * v + [0] * t)
        if inter:
            kinds = kinds[torch.randperm(t + v, generator=g)]
        else:
            kinds = torch.cat([torch.zeros(min(2, t)), torch.ones(v), torch.zeros(t - min(2, t))]).long()
        start = seq - t - v if padding_side == "left" else 0
        ids[r, start : start + t + v] = torch.randint(4, vocab, (t + v,), generator=g)
        am[r, start : start + t + v] = 1
        vm[r, start : start + t + v] = kinds.bool()
    return ids, am, vm


def greedy_steps(
    model: torch.nn.Module,
    ids: torch.Tensor,
    am: torch.Tensor,
    vm: torch.Tensor,
    steps: int,
    own_positions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill a bare decoder (``vision_mask`` ``vm``), then ``steps`` cached greedy steps: (new tokens [B, steps],
    logits [B, steps, V]). ``own_positions``: positions count each row's real tokens, as ``generate()`` numbers them
    (DART's pivots read keys after RoPE, whose norms depend on the absolute position); otherwise the model's own,
    0..T-1 over the padded rows, as :func:`pmod.testing.reference.reference_logits` has them."""
    from transformers import DynamicCache

    from pmod.core.cache import cache_kwargs

    cache, logits, new = DynamicCache(), [], []
    positions = {"position_ids": (am.cumsum(1) - 1).clamp(min=0)} if own_positions else {}
    with torch.no_grad():
        step = model(input_ids=ids, attention_mask=am, vision_mask=vm, **positions, **cache_kwargs(cache),
                     use_cache=True)  # fmt: skip
        for _ in range(steps):
            logits.append(step.logits[:, -1])
            token = step.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
            am = torch.cat([am, torch.ones_like(token)], dim=1)
            positions = {"position_ids": am.sum(1, keepdim=True) - 1} if own_positions else {}
            step = model(input_ids=token, attention_mask=am, **positions, **cache_kwargs(cache), use_cache=True)
    return torch.cat(new, dim=1), torch.stack(logits, dim=1)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing under the installed transformers' name: ``activation_checkpointing_
    enable`` from 5.24, ``gradient_checkpointing_enable`` (a deprecated alias there) before."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
