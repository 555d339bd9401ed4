"""`pmod viz`: plot which vision tokens each routed layer keeps for an image (schedule, layer x token heatmap,
kept-token overlays). torch, matplotlib and the model code load inside the functions, after the flags are read."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.errors import UserError

if TYPE_CHECKING:
    import torch

    from pmod.analysis.plots import ImageRouting


def image_routing(model: torch.nn.Module, processor: Any, image: Any, prompt: str) -> ImageRouting:
    """One forward over ``prompt`` about ``image``: what each routed layer kept of the image's tokens."""
    from pmod.analysis import plots
    from pmod.io.loading import build_prompt

    inputs = processor(text=[build_prompt(processor, prompt, 1)], images=[image], return_tensors="pt")
    return plots.image_routing(model, processor, inputs, image)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a routed LLaVA or LLaVA-NeXT model")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from pmod.data.images import open_image
    from pmod.io.loading import check_model_folder, load_model

    config = check_model_folder(args.model, "pmod viz")
    if "pmod_method" not in config and "pmod" not in config:
        raise UserError(
            f"{args.model} is a dense model: there is no routing to show. Convert it (pmod.convert) or train it "
            f"with pmod train first."
        )
    image = open_image(args.image)
    model, processor = load_model(args.model, args.device, "pmod viz")

    from pmod.analysis import plots
    from pmod.core.convert import layer_ratios

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
