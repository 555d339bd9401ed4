"""Plots of routed models: the retention schedule, training loss curves, which vision tokens each routed layer kept
(a layer x token heatmap, like Figure 6 of the p-MoD paper) and images with the kept tokens highlighted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DENSE_COLOR, ROUTED_COLOR = "#999999", "#1f77b4"


def plot_schedule(ratios: Sequence[float | None], path: str | Path, title: str = "retention per layer") -> Path:
    """Bar chart of per-layer retention: routed layers in blue, dense layers (every token, 1.0) in grey."""
    from matplotlib.patches import Patch

    values = [1.0 if r is None else r for r in ratios]
    colors = [DENSE_COLOR if r is None else ROUTED_COLOR for r in ratios]
    fig, ax = plt.subplots(figsize=(max(5, len(values) * 0.3), 3.2))
    ax.bar(range(len(values)), values, color=colors)
    ax.set(xlabel="layer", ylabel="share of vision\ntokens processed", ylim=(0, 1.15), title=title)
    mean = ax.axhline(np.mean(values), ls="--", color="k", lw=0.8)
    handles = [Patch(color=ROUTED_COLOR), Patch(color=DENSE_COLOR), mean]
    labels = ["routed layer", "dense layer (every token)", f"mean {np.mean(values):.3f}"]
    ax.legend(handles, labels, loc="upper right", fontsize=7, ncol=3)
    return _save(fig, path)


def plot_loss_curves(curves: dict[str, tuple[Sequence[int], Sequence[float]]], path: str | Path) -> Path:
    """Training loss against step, one line per run."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=name)
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="training loss")
    ax.legend()
    return _save(fig, path)


@dataclass
class ImageRouting:
    """Which vision tokens of one image each routed layer processed.

    ``kept`` is bool [num routed layers, n_vision] in the order of ``layers``; ``grid`` (rows, cols) maps the first
    ``rows * cols`` vision tokens onto ``image`` (the base view the model saw, HxWx3 uint8).
    """

    layers: list[int]
    kept: np.ndarray
    weights: np.ndarray
    grid: tuple[int, int]
    image: np.ndarray
    num_layers: int = 0  # every decoder layer, routed or dense (0: unknown)

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.layers]


def _dense_note(routing: ImageRouting) -> str:
    dense = routing.dense_layers
    if not dense:
        return ""
    runs = _runs(dense)
    return f"layers {runs} are dense (every token) and not shown"


def _runs(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    out, start = [], indices[0]
    for prev, cur in zip(indices, [*indices[1:], None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def plot_token_heatmap(routing: ImageRouting, path: str | Path, title: str = "vision tokens kept per layer") -> Path:
    """Routed layer x vision-token map: dark = processed by that layer, light = skipped, with a legend; tokens in
    the image's row-by-row order (left to right, top to bottom); dense layers named under the plot."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.3 * len(routing.layers) + 1.6)))
    cmap = ListedColormap(["#deebf7", "#08519c"])
    ax.imshow(routing.kept.astype(float), aspect="auto", cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(len(routing.layers)), [str(i) for i in routing.layers])
    rows, cols = routing.grid
    xlabel = f"vision token: the image's {rows}x{cols} patches row by row (left to right, top to bottom)"
    note = _dense_note(routing)
    ax.set(xlabel=xlabel + (f"\n{note}" if note else ""), ylabel="routed layer", title=title)
    ax.legend([Patch(color="#08519c"), Patch(color="#deebf7")], ["kept (processed)", "skipped"],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # fmt: skip
    return _save(fig, path)


def plot_kept_overlay(routing: ImageRouting, path: str | Path, depths: Sequence[int] | None = None) -> Path:
    """The image beside copies with the kept tokens of a few routed layers highlighted (skipped ones dimmed)."""
    rows, cols = routing.grid
    picks = list(depths) if depths is not None else _spread(len(routing.layers), 3)
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(2.8 * (len(picks) + 1), 3.4))
    axes[0].imshow(routing.image)
    axes[0].set_title("image", fontsize=9)
    h, w = routing.image.shape[:2]
    for ax, i in zip(axes[1:], picks):
        kept = routing.kept[i, : rows * cols]
        mask = kept_pixel_mask(kept, routing.grid, (h, w))
        shown = routing.image.astype(float) * (0.25 + 0.75 * mask[..., None])
        ax.imshow(shown.astype(np.uint8))
        ax.set_title(f"layer {routing.layers[i]}\n{kept.mean():.0%} of tokens kept", fontsize=9)
    for ax in axes:
        ax.axis("off")
    note = _dense_note(routing)
    fig.suptitle("kept tokens at full brightness, skipped tokens dimmed" + (f"; {note}" if note else ""),
                 fontsize=8, y=0.02, va="bottom")  # fmt: skip
    return _save(fig, path)


def kept_pixel_mask(kept: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W]: whether the token whose patch covers each pixel was kept (tokens in raster order)."""
    rows, cols = grid
    cells = np.asarray(kept, dtype=bool).reshape(rows, cols)
    h, w = size
    return cells[(np.arange(h) * rows) // h][:, (np.arange(w) * cols) // w]


def image_routing(model: torch.nn.Module, processor: Any, inputs: Any, image: Any = None) -> ImageRouting:
    """Run one forward over the encoded prompt ``inputs`` (one image, batch 1) and collect what each routed layer
    kept of the image's tokens, laid on the model's own token grid (the backbone adapter's ``image_grid``).

    The view shown is the image the tower saw when the processor's pixels are images (LLaVA family), else ``image``
    (Qwen-VL's pixels are flattened patches) resized to the grid.
    """
    from pmod.core.backbone import backbone_for
    from pmod.core.convert import record_routing

    adapter = backbone_for(model)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with record_routing(model) as rec, torch.inference_mode():
        model(**inputs)
    vision = (inputs["input_ids"][0] == model.config.image_token_id).cpu()
    layers = sorted(rec.processed)
    kept = np.stack([rec.processed[i][0][0].cpu()[vision].numpy() for i in layers])
    weights = np.stack([_weights_row(rec.weights[i][0], vision) for i in layers])
    grid = adapter.image_grid(model, inputs) if adapter.image_grid is not None else None
    if grid is None:  # no grid known: the closest square
        side = int(np.sqrt(int(vision.sum())))
        grid = (side, side)
    pixels = inputs["pixel_values"]
    if pixels.dim() >= 4 and processor is not None:  # images (LLaVA-NeXT / OneVision: tiles, base view first)
        view = _unnormalize(processor, pixels[0] if pixels.dim() == 4 else pixels[0, 0])
    elif image is not None:
        rows, cols = grid
        view = np.asarray(image.convert("RGB").resize((cols * 16, rows * 16)))
    else:
        raise ValueError("image_routing needs the image itself for a model whose pixels are flattened patches")
    num_layers = len(adapter.decoder_layers(model))
    return ImageRouting(layers, kept, weights, grid, view, num_layers)


def _weights_row(weights: torch.Tensor | None, vision: torch.Tensor) -> np.ndarray:
    if weights is None:  # a method without per-token weights
        return np.full(int(vision.sum()), np.nan, dtype=np.float32)
    return weights[0].cpu()[vision].numpy()


def _unnormalize(processor: Any, pixels: torch.Tensor) -> np.ndarray:
    ip = processor.image_processor
    mean = torch.tensor(getattr(ip, "image_mean", [0.0] * 3)).view(3, 1, 1)
    std = torch.tensor(getattr(ip, "image_std", [1.0] * 3)).view(3, 1, 1)
    image = (pixels.float().cpu() * std + mean).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def _spread(n: int, k: int) -> list[int]:
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # titles and legends outside the axes stay whole
    plt.close(fig)
    return path


def plot_arank(values: Sequence[float], threshold: float, chosen: Sequence[int], path: str | Path) -> Path:
    """Per-layer ARank as bars: MoD layers (below the threshold) in blue, dense layers in grey, the threshold dashed."""
    picked = set(chosen)
    fig, ax = plt.subplots(figsize=(max(4, len(values) * 0.3), 3))
    colors = ["#1f77b4" if i in picked else "#999999" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(threshold, ls="--", color="k", lw=0.8, label=f"threshold {threshold:.1f}")
    ax.set(xlabel="layer", ylabel="ARank (mean rank of Q K^T)", title="attention rank per layer (blue: MoD layers)")
    ax.legend(loc="lower right")
    return _save(fig, path)
