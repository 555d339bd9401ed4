"""The ``pmod`` command: a thin table of subcommands over the recipes.

Each entry names a module that defines ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported
only when their subcommand runs, so ``pmod --help`` stays fast. A :class:`pmod.UserError` (an error the user can
fix) is printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pmod.core.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pmod.recipes.demo", "the main job: train dense vs p-MoD on a synthetic VQA task; accuracy and cost"),
    "flops": ("pmod.recipes.flops", "analytic FLOPs and KV-cache bytes of dense vs a routing method"),
    "train": ("pmod.recipes.train", "stage-1 (projector) / stage-2 (routed finetune) training on the HF Trainer"),
    "generate": ("pmod.recipes.generate", "answer prompts about images with a model folder (streams; batches)"),
    "viz": ("pmod.recipes.viz", "plot which vision tokens each routed layer keeps for an image"),
    "arank": ("pmod.recipes.arank", "per-layer attention rank (gamma-MoD's ARank) of a model on LLaVA samples"),
    "data": ("pmod.recipes.data", "LLaVA-format data: synth (make a synthetic VQA set), check (find bad records)"),
}

#: The error class of the command line (an alias kept from pmod 0.1).
CLIError = UserError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pmod", description="Mixture-of-Depths multimodal LLMs (p-MoD and kin).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv else None
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # only the chosen subcommand pays for its imports
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UserError as err:
        print(f"pmod {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
