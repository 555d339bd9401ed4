"""`pmod import-llava`: turn a checkpoint of the original LLaVA code base (LLaVA-1.5, LLaVA-NeXT) or of the p-MoD
authors' fork (the released p-MoD-LLaVA models) into a model folder that every pmod command opens."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmod.core.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of the original checkpoint (config.json, weights, tokenizer)")
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument(
        "--vision-tower",
        help="local CLIP folder: tower weights when the checkpoint lacks them, "
        "its config and image preprocessing (default: known openai/clip-vit-large-patch14-336)",
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the weights (default: keep)")


def run(args: argparse.Namespace) -> int:
    from pmod.core.files import check_new_folder
    from pmod.io.importers.original_config import read_source

    # The mistakes a user can make with the flags answer here, before torch and transformers load.
    check_new_folder(args.out)
    settings = read_source(args.src)
    if args.vision_tower is not None and not (Path(args.vision_tower) / "config.json").is_file():
        raise UserError(f"--vision-tower {args.vision_tower} has no config.json; pass a local CLIP folder (e.g. a "
                        f"download of {settings.vision_tower}).")  # fmt: skip

    from pmod.io.importers.original_llava import import_llava

    out = import_llava(args.src, args.out, vision_tower=args.vision_tower, dtype=args.dtype, progress=True)
    config = json.loads((Path(out) / "config.json").read_text())
    method = config.get("pmod_method")
    if method is None:
        how = "transformers' from_pretrained (pmod.convert turns it into any method)"
    else:
        ratios = method["settings"]["ratios"]
        routed = [i for i, r in enumerate(ratios) if r is not None]
        how = f"pmod.load ({len(routed)} routed layers, {routed[0]}-{routed[-1]})" if routed else "pmod.load"
    print(f"imported {args.src} as {config['architectures'][0]} into {out}; open it with {how}", file=sys.stderr)
    print(f"try: pmod generate --model {out} --image IMAGE --prompt 'Describe the image.'", file=sys.stderr)
    return 0
