"""VisionZip written again from the paper's rule (Yang et al., CVPR 2025), on the unconverted LLaVA model, for the
tests: the tower run with its attention weights returned (eager attention), the [CLS] attention of the layer
that gives the features (hidden state -2: attentions[-2]) summed over heads, the keys of that layer read off its
``k_proj``; per image, in plain loops: the [CLS] token and the top ``dominant - 1`` patches, the rest merged into
``contextual`` targets at a uniform stride by cosine similarity of head-averaged keys (target + mean of its group);
then each row's sequence rebuilt with the reduced tokens in place of the image's placeholders and the unconverted
language model run on it alone."""

from __future__ import annotations

import copy

import torch
from torch import nn


def tower_outputs(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden state -2 [N, 1 + P, D], the [CLS] row of attentions[-2] [N, heads, 1 + P] and the keys of the layer
    that made hidden state -2, averaged over heads [N, 1 + P, head_dim]."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    layer = getattr(tower, "vision_model", tower).encoder.layers[-2]
    seen = {}
    handle = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(keys=out))
    try:
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    heads = layer.self_attn.num_heads
    keys = seen["keys"]
    keys = keys.view(*keys.shape[:2], heads, -1).mean(2)
    return out.hidden_states[-2], out.attentions[-2][:, :, 0, :], keys


def reduce_image(hidden: torch.Tensor, cls_row: torch.Tensor, keys: torch.Tensor, dominant: int,
                 contextual: int) -> torch.Tensor:  # fmt: skip
    """One image: [dominant + contextual, D]."""
    return reduce_view(hidden, cls_row, keys, dominant, contextual)[0]


def reduce_view(hidden: torch.Tensor, cls_row: torch.Tensor, keys: torch.Tensor, dominant: int,
                contextual: int) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """One view: its reduced tokens [dominant + contextual, D] and its dominant patches (1-based, in order)."""
    scores = cls_row[:, 1:].sum(0)
    best = sorted(int(i) + 1 for i in scores.argsort(descending=True)[: dominant - 1])
    chosen = [0, *best]
    others = [j for j in range(hidden.shape[0]) if j not in chosen]
    if contextual == 0:
        return hidden[chosen], best
    step = max(1, len(others) // contextual)
    target_slots = list(range(0, len(others), step))[:contextual]
    targets = [others[s] for s in target_slots]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups: dict[int, list[int]] = {t: [] for t in targets}
    for j in others:
        if j in targets:
            continue
        sims = [float(unit[j] @ unit[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(j)
    merged = [hidden[t] + (hidden[groups[t]].mean(0) if groups[t] else 0) for t in targets]
    return torch.cat([hidden[chosen], torch.stack(merged)]), best


def next_image(model: nn.Module, crops: torch.Tensor, cols: int, dominant: int, contextual: int) -> torch.Tensor:
    """One LLaVA-NeXT image as the authors lay it out: its base view reduced; then the tiles' dominant patches,
    sorted by their place on the whole tile grid (row by row); each tile's [CLS] token; each tile's contextual
    tokens; projected."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    hidden, cls_rows, keys = tower_outputs(model, crops)
    views = [reduce_view(hidden[v], cls_rows[v], keys[v], dominant, contextual) for v in range(len(crops))]
    placed = []
    for t, (tokens, best) in enumerate(views[1:]):
        row, col = t // cols, t % cols
        for slot, patch in enumerate(best, start=1):
            y, x = row * side + (patch - 1) // side, col * side + (patch - 1) % side
            placed.append((y * cols * side + x, tokens[slot]))
    dominant_tokens = [vector for _, vector in sorted(placed, key=lambda item: item[0])]
    tiles = [tokens for tokens, _ in views[1:]]
    parts = [views[0][0], *[v[None] for v in dominant_tokens], *[t[:1] for t in tiles],
             *[t[dominant:] for t in tiles]]  # fmt: skip
    return model.model.multi_modal_projector(torch.cat(parts)[None])[0]


def visionzip_reference_logits(model: nn.Module, batch: dict[str, torch.Tensor], dominant: int,
                               contextual: int) -> list[torch.Tensor]:  # fmt: skip
    """Per row, the logits [L_r, V] of the unconverted LLaVA or LLaVA-NeXT ``model`` on the row's real tokens with
    each image's placeholders replaced by its reduced tokens (``batch``: input_ids, attention_mask, pixel_values,
    image_sizes for NeXT)."""
    config = model.config
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    images, placeholders = [], []
    if batch.get("pixel_values") is not None and "image_sizes" in batch:  # LLaVA-NeXT: one image per row here
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            image_size_to_num_patches,
        )

        side, pins = config.vision_config.image_size, config.image_grid_pinpoints
        counts = [int(c) for c in (batch["input_ids"] == config.image_token_id).sum(1) if c]
        for pixels, size, count in zip(batch["pixel_values"], batch["image_sizes"].tolist(), counts, strict=True):
            _, cols = get_anyres_image_grid_shape(size, pins, side)
            views = image_size_to_num_patches(size, pins, side)
            images.append(next_image(model, pixels[:views], cols, dominant, contextual))
            placeholders.append(count)
    elif batch.get("pixel_values") is not None:
        hidden, cls_rows, keys = tower_outputs(model, batch["pixel_values"])
        for i in range(hidden.shape[0]):
            reduced = reduce_image(hidden[i], cls_rows[i], keys[i], dominant, contextual)
            images.append(model.model.multi_modal_projector(reduced[None])[0])
            placeholders.append(per_image)
    embed = model.get_input_embeddings()
    logits, image = [], 0
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = ids[mask.bool()]
        pieces, j = [], 0
        while j < len(ids):
            if ids[j] == config.image_token_id:
                pieces.append(images[image])
                image, j = image + 1, j + placeholders[image]
            else:
                pieces.append(embed(ids[j : j + 1]))
                j += 1
        out = model.model.language_model(inputs_embeds=torch.cat(pieces)[None])
        logits.append(model.lm_head(out.last_hidden_state)[0])
    return logits
