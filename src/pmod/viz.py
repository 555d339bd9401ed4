"""Plots: the retention schedule, training loss curves, which vision tokens each p-MoD layer kept (a layer x token
heatmap, like Figure 6 of the p-MoD paper) and images with the kept tokens highlighted; plus `pmod viz`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display here or on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pmod.cli import CLIError  # noqa: E402


def plot_schedule(ratios: Sequence[float | None], path: str | Path, title: str = "retention per layer") -> Path:
    """Bar chart of per-layer retention (dense layers as 1.0, drawn in grey)."""
    values = [1.0 if r is None else r for r in ratios]
    colors = ["#999999" if r is None else "#1f77b4" for r in ratios]
    fig, ax = plt.subplots(figsize=(max(4, len(values) * 0.3), 3))
    ax.bar(range(len(values)), values, color=colors)
    ax.set(xlabel="layer", ylabel="share of vision tokens processed", ylim=(0, 1.05), title=title)
    ax.axhline(np.mean(values), ls="--", color="k", lw=0.8, label=f"mean {np.mean(values):.3f}")
    ax.legend(loc="upper right")
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
    """Which vision tokens of one image each p-MoD layer processed.

    ``kept`` is bool [num p-MoD layers, n_vision] in the order of ``layers``; ``grid`` (rows, cols) maps the first
    ``rows * cols`` vision tokens onto ``image`` (the base view the model saw, HxWx3 uint8).
    """

    layers: list[int]
    kept: np.ndarray
    weights: np.ndarray
    grid: tuple[int, int]
    image: np.ndarray


def plot_token_heatmap(routing: ImageRouting, path: str | Path, title: str = "vision tokens kept per layer") -> Path:
    """Layer x vision-token map: dark = processed by that layer, light = skipped."""
    fig, ax = plt.subplots(figsize=(8, max(2, 0.3 * len(routing.layers) + 1)))
    ax.imshow(routing.kept.astype(float), aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    ax.set_yticks(range(len(routing.layers)), [str(i) for i in routing.layers])
    ax.set(xlabel="vision token (raster order)", ylabel="layer", title=title)
    return _save(fig, path)


def plot_kept_overlay(routing: ImageRouting, path: str | Path, depths: Sequence[int] | None = None) -> Path:
    """The image beside copies with the kept tokens of a few p-MoD layers highlighted (skipped ones dimmed)."""
    rows, cols = routing.grid
    picks = list(depths) if depths is not None else _spread(len(routing.layers), 3)
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(2.4 * (len(picks) + 1), 2.6))
    axes[0].imshow(routing.image)
    axes[0].set_title("image")
    h, w = routing.image.shape[:2]
    for ax, i in zip(axes[1:], picks):
        kept = routing.kept[i, : rows * cols]
        mask = kept_pixel_mask(kept, routing.grid, (h, w))
        shown = routing.image.astype(float) * (0.25 + 0.75 * mask[..., None])
        ax.imshow(shown.astype(np.uint8))
        ax.set_title(f"layer {routing.layers[i]}: {kept.mean():.0%} kept")
    for ax in axes:
        ax.axis("off")
    return _save(fig, path)


def kept_pixel_mask(kept: np.ndarray, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Bool [H, W]: whether the token whose patch covers each pixel was kept (tokens in raster order)."""
    rows, cols = grid
    cells = np.asarray(kept, dtype=bool).reshape(rows, cols)
    h, w = size
    return cells[(np.arange(h) * rows) // h][:, (np.arange(w) * cols) // w]


def image_routing(model: torch.nn.Module, processor: Any, image: Any, prompt: str) -> ImageRouting:
    """Run one forward over ``prompt`` about ``image`` and collect what each p-MoD layer kept of its vision tokens."""
    import pmod
    from pmod.generate import build_prompt

    inputs = processor(text=[build_prompt(processor, prompt, 1)], images=[image], return_tensors="pt")
    inputs = inputs.to(model.device)
    with pmod.record_routing(model) as rec, torch.inference_mode():
        model(**inputs)
    vision = (inputs["input_ids"][0] == model.config.image_token_id).cpu()
    layers = sorted(rec.processed)
    kept = np.stack([rec.processed[i][0][0].cpu()[vision].numpy() for i in layers])
    weights = np.stack([rec.weights[i][0][0].cpu()[vision].numpy() for i in layers])
    vc = model.config.vision_config
    side = vc.image_size // vc.patch_size
    pixels = inputs["pixel_values"][0]
    if pixels.dim() == 4:  # LLaVA-NeXT: the first tile is the whole image, and its tokens come first
        pixels = pixels[0]
    return ImageRouting(layers, kept, weights, (side, side), _unnormalize(processor, pixels))


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a p-MoD LLaVA or LLaVA-NeXT model")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    import pmod
    from pmod.generate import load_model, open_image

    image = open_image(args.image)
    model, processor = load_model(args.model, args.device)
    if not pmod.is_pmod_model(model):
        raise CLIError(f"{args.model} is a dense model: there is no routing to show. Convert and train it first.")
    routing = image_routing(model, processor, image, args.prompt)
    out = Path(args.out)
    paths = [
        plot_schedule(pmod.layer_ratios(model), out / "schedule.png"),
        plot_token_heatmap(routing, out / "token_heatmap.png"),
        plot_kept_overlay(routing, out / "kept_tokens.png"),
    ]
    for path in paths:
        print(path)
    return 0
