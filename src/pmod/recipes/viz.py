"""`pmod viz`: plot which vision tokens each routed layer keeps for an image (schedule, layer x token heatmap,
kept-token overlays); ``--method fastv`` applies a training-free method to a dense folder as it loads. torch,
matplotlib and the model code load inside the functions, after the flags are read."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pmod.core.errors import UserError
from pmod.recipes import method_flags

if TYPE_CHECKING:
    import torch

    from pmod.analysis.plots import ImageRouting


def image_routing(model: torch.nn.Module, processor: Any, image: Any, prompt: str) -> ImageRouting:
    """One forward over ``prompt`` about ``image``: what each routed layer kept of the image's tokens."""
    from pmod.analysis import plots
    from pmod.io.model_folder import build_prompt

    inputs = processor(text=[build_prompt(processor, prompt, 1)], images=[image], return_tensors="pt")
    return plots.image_routing(model, processor, inputs, image)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a routed model (or a dense one with --method)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--device", default="auto")
    method_flags.add_on_the_fly_arguments(parser)


def routes_no_layer(config: dict[str, Any]) -> bool:
    """Whether a routed folder's stored settings leave every decoder layer dense (read from config.json)."""
    from pmod.analysis.dims import LMDims
    from pmod.core.config import stored_method_config

    stored = stored_method_config(config)
    try:
        return stored is not None and all(r is None for r in stored.layer_ratios(LMDims.from_config(config).layers))
    except (ValueError, TypeError, KeyError):  # settings the model cannot run: loading says what is wrong
        return False


def run(args: argparse.Namespace) -> int:
    from pmod.core.config import stored_method_config
    from pmod.core.files import check_output_folder
    from pmod.data.images import open_image
    from pmod.io.model_folder import check_model_folder, load_model

    method_config = method_flags.on_the_fly_config(vars(args))
    config = check_model_folder(args.model, "pmod viz", method_config)
    if stored_method_config(config) is None and method_config is None:
        raise UserError(
            f"{args.model} is a dense model: there is no routing to show. Apply a training-free method with "
            f"--method {' / '.join(method_flags.training_free_methods())}, or convert it (pmod.convert) or train "
            f"it with pmod train first."
        )
    chosen = method_config or stored_method_config(config)
    if chosen is not None and not chosen.routes_layers:
        raise UserError(f"pmod viz shows the tokens each routed decoder layer keeps; {chosen.display_name} routes no "
                        f"layer (it shortens each image's tokens before the decoder), so there is nothing to show: "
                        f"run pmod generate or pmod flops with it")  # fmt: skip
    if routes_no_layer(config):
        raise UserError(f"no layer of {args.model} is routed (its settings leave every layer dense): it runs as the "
                        f"dense model and there is no routing to show; pass a model with routed layers.")  # fmt: skip
    image = open_image(args.image)
    out = check_output_folder(args.out, "--out")  # before the model loads: an --out that is a file fails now
    model, processor = load_model(args.model, args.device, "pmod viz", method_config)

    from pmod.analysis import plots
    from pmod.core.convert import layer_ratios

    routing = image_routing(model, processor, image, args.prompt)
    paths = [
        plots.plot_schedule(layer_ratios(model), out / "schedule.png"),
        plots.plot_token_heatmap(routing, out / "token_heatmap.png"),
        plots.plot_kept_overlay(routing, out / "kept_tokens.png"),
    ]
    for path in paths:
        print(path)
    return 0
