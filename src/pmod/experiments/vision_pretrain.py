"""Pre-train a small ViT vision tower on what each image patch shows: the demo's stand-in for a pre-trained CLIP.

LLaVA starts from a vision tower pre-trained elsewhere and keeps it frozen. Nothing pre-trained can be downloaded
here, and a tower trained from scratch together with the language model did not learn to see within the demo's
budget: the loss stayed at the answer priors (see ``pmod.experiments.demo``). Supervising the tower alone on per-patch
labels of the synthetic set takes under a minute and gives features in which each patch says what it shows and where,
as a real pre-trained tower's features do. The targets:

- ``shape`` and ``color``: the kind and colour of the shape the patch shows, 0 for background
  (:func:`pmod.data.synth.patch_labels`), classified, with background weighted down;
- ``row`` and ``column``: the patch's grid position, regressed as coordinates in [-1, 1];
- ``side``: for a patch that shows a shape, whether it lies in the left or the right half of the image (0 for
  background), classified. Like colour, it is then carried by the shape's patches alone, so a decoder that finds the
  shape reads its side off the same tokens. Without this target (row/column only) the demo's decoder stayed at chance
  on "left or right?" questions after 200 steps; with the half marked on every patch, background included, it learnt
  them in a hand-written training loop but not in the ``pmod train`` recipe.

The labels are read from the features at the layer LLaVA uses (``vision_feature_layer``, class token dropped), so the
language model later sees exactly what was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmod.data.synth import COLORS, SHAPES, patch_labels
from pmod.experiments.small_llava import tower_attention_outputs

#: The per-patch targets: ``shape``, ``color`` and ``side`` are classes (0 = background), ``row`` and ``column``
#: coordinates.
TARGETS = ("shape", "color", "row", "column", "side")
_COORDINATES = ("row", "column")
_BACKGROUND_CLASSES = ("shape", "color", "side")  # class 0 is background
#: Outputs of each target's head: the classes with background, one coordinate each for row and column.
_HEAD_SIZES = {"shape": 1 + len(SHAPES), "color": 1 + len(COLORS), "row": 1, "column": 1, "side": 3}


def _coordinate(index: torch.Tensor, n: int) -> torch.Tensor:
    """Grid index 0..n-1 -> coordinate in [-1, 1]."""
    return index.float() / max(n - 1, 1) * 2 - 1


def _index(coordinate: torch.Tensor, n: int) -> torch.Tensor:
    """Coordinate -> the nearest grid index."""
    return ((coordinate + 1) / 2 * (n - 1)).round().clamp(0, n - 1).long()


def _tower_and_layer(model: nn.Module) -> tuple[nn.Module, int]:
    base = getattr(model, "model", model)
    tower = getattr(base, "vision_tower", None)
    if tower is None:
        raise ValueError(f"{type(model).__name__} has no vision_tower; pass a LLaVA model")
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("vision_feature_layer must be a single layer index for patch pre-training")
    return tower, layer


def _patch_features(tower: nn.Module, layer: int, pixel_values: torch.Tensor) -> torch.Tensor:
    hidden = tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]
    return hidden[:, 1:]  # drop the class token, as vision_feature_select_strategy="default" does


def load_patch_dataset(
    records: list[dict[str, Any]], image_folder: str | Path, processor: Any, patch_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values (N, C, H, W) and per-patch targets (N, patches) for the image records that carry ``meta``."""
    from pmod.data.images import open_image

    pixels, targets = [], {name: [] for name in TARGETS}
    for record in records:
        if not record.get("image") or "meta" not in record:
            continue
        image = open_image(Path(image_folder) / record["image"])
        labels = patch_labels(image, record["meta"], patch_size)
        rows, cols = labels["grid"]
        pixels.append(processor.image_processor(image, return_tensors="pt")["pixel_values"][0])
        targets["shape"].append(labels["shape"])
        targets["color"].append(labels["color"])
        targets["row"].append([i // cols for i in range(rows * cols)])
        targets["column"].append([i % cols for i in range(rows * cols)])
        on_object = [int(k > 0) for k in labels["shape"]]
        targets["side"].append([on_object[i] * (1 + int(i % cols >= cols // 2)) for i in range(rows * cols)])
    if not pixels:
        raise ValueError("no image records with 'meta' (per-shape labels); use data from pmod data synth")
    return torch.stack(pixels), {k: torch.tensor(v) for k, v in targets.items()}


def patch_accuracy(
    model: nn.Module, heads: nn.ModuleDict, pixels: torch.Tensor, targets: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Per-target accuracy over all patches, plus ``shape_on_object``, ``color_on_object`` and ``side_on_object``:
    accuracy on the patches that show a shape (the base rate of background makes the plain accuracy look high)."""
    tower, layer = _tower_and_layer(model)
    with torch.no_grad():
        features = torch.cat([_patch_features(tower, layer, p) for p in pixels.split(64)])
    result = {}
    on_object = targets["shape"] > 0
    for name, head in heads.items():
        out = head(features)
        if name in _COORDINATES:
            predicted = _index(out.squeeze(-1), int(round(targets[name].shape[1] ** 0.5)))
        else:
            predicted = out.argmax(-1)
        hit = predicted == targets[name]
        result[name] = round(float(hit.float().mean()), 4)
        if name in _BACKGROUND_CLASSES:
            result[f"{name}_on_object"] = round(float(hit[on_object].float().mean()), 4)
    return result


def pretrain_vision_tower(
    model: nn.Module,
    processor: Any,
    train_records: list[dict[str, Any]],
    image_folder: str | Path,
    *,
    steps: int,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    seed: int = 0,
    eval_records: list[dict[str, Any]] | None = None,
    background_weight: float = 0.1,
    progress: bool = True,
    patch_local: bool = False,
) -> dict[str, Any]:
    """Train ``model``'s vision tower in place on per-patch labels: linear heads on the LLaVA feature layer, the sum
    of cross-entropy (background patches weighted by ``background_weight``) and coordinate MSE, AdamW with a
    one-cycle schedule. The heads are dropped afterwards; only the tower keeps what it learned.

    Returns ``{"loss": [(step, loss)], "accuracy": {...}}`` (see :func:`patch_accuracy`), measured on
    ``eval_records`` (held-out images) when given, else on the training images.
    """
    from tqdm.auto import tqdm

    tower, layer = _tower_and_layer(model)
    patch_size = model.config.vision_config.patch_size
    pixels, targets = load_patch_dataset(train_records, image_folder, processor, patch_size)
    side = int(round(targets["row"].shape[1] ** 0.5))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads = nn.ModuleDict({name: nn.Linear(tower.config.hidden_size, _HEAD_SIZES[name]) for name in TARGETS})
    muted = {id(p) for m in tower_attention_outputs(model) for p in m.parameters()} if patch_local else set()
    params = [p for p in tower.parameters() if id(p) not in muted] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    was_training = tower.training
    tower.train()
    for p in tower.parameters():
        p.requires_grad_(True)
    weights = _class_weights(background_weight)
    history = []
    bar = tqdm(range(steps), desc="vision tower pre-training", disable=not progress)
    for step in bar:
        index = torch.randint(len(pixels), (min(batch_size, len(pixels)),), generator=generator)
        loss = _patch_loss(heads, _patch_features(tower, layer, pixels[index]), targets, index, weights, side)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        history.append((step + 1, round(loss.item(), 4)))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.train(was_training)
    if eval_records is not None:
        pixels, targets = load_patch_dataset(eval_records, image_folder, processor, patch_size)
    return {"loss": history, "accuracy": patch_accuracy(model, heads, pixels, targets)}


def _class_weights(background_weight: float) -> dict[str, torch.Tensor | None]:
    """Cross-entropy class weights per target: background (class 0) weighed down to ``background_weight``, since
    most patches are background and the few shape patches should drive the shape and colour heads; None for the
    coordinates."""
    weights: dict[str, torch.Tensor | None] = {name: None for name in TARGETS}
    for name in _BACKGROUND_CLASSES:
        weights[name] = torch.ones(_HEAD_SIZES[name])
        weights[name][0] = background_weight
    return weights


def _patch_loss(
    heads: nn.ModuleDict,
    features: torch.Tensor,
    targets: dict[str, torch.Tensor],
    index: torch.Tensor,
    weights: dict[str, torch.Tensor | None],
    side: int,
) -> torch.Tensor:
    """The summed loss of every head on a batch (the images ``index`` of ``targets``): coordinate MSE for row and
    column, weighted cross-entropy for the classes."""
    return sum(
        nn.functional.mse_loss(head(features).squeeze(-1), _coordinate(targets[name][index], side))
        if name in _COORDINATES
        else nn.functional.cross_entropy(
            head(features).flatten(0, 1), targets[name][index].flatten(), weight=weights[name]
        )
        for name, head in heads.items()
    )
