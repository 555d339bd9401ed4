"""`pmod viz`: plot which vision tokens each routed layer keeps for an image (schedule, layer x token heatmap,
kept-token overlays)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from pmod.analysis import plots
from pmod.core.convert import is_routed_model, layer_ratios
from pmod.core.errors import UserError
from pmod.data.images import open_image
from pmod.io.loading import build_prompt, load_model


def image_routing(model: torch.nn.Module, processor: Any, image: Any, prompt: str) -> plots.ImageRouting:
    """One forward over ``prompt`` about ``image``: what each routed layer kept of the image's tokens."""
    inputs = processor(text=[build_prompt(processor, prompt, 1)], images=[image], return_tensors="pt")
    return plots.image_routing(model, processor, inputs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a routed LLaVA or LLaVA-NeXT model")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    image = open_image(args.image)
    model, processor = load_model(args.model, args.device)
    if not is_routed_model(model):
        raise UserError(f"{args.model} is a dense model: there is no routing to show. Convert and train it first.")
    routing = image_routing(model, processor, image, args.prompt)
    out = Path(args.out)
    paths = [
        plots.plot_schedule(layer_ratios(model), out / "schedule.png"),
        plots.plot_token_heatmap(routing, out / "token_heatmap.png"),
        plots.plot_kept_overlay(routing, out / "kept_tokens.png"),
    ]
    for path in paths:
        print(path)
    return 0
