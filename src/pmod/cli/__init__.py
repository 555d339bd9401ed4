"""The ``pmod`` command: a thin table of subcommands over the recipes.

Each entry names a module that defines ``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen
subcommand's module is imported, and command modules import torch and transformers only inside ``run``, so
``--help`` and flag mistakes answer at once. A :class:`pmod.UserError` (an error the user can fix) is printed as one
line, without a traceback; so are flag errors, after the subcommand's usage. Dashes and underscores are the same in
flag names (``--data-path`` = ``--data_path``), and flags are never abbreviated.
"""

from __future__ import annotations

import difflib
import importlib
import sys

from pmod.core.errors import UserError
from pmod.recipes.parsing import CommandParser, dashed

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pmod.experiments.demo", "the main job: train dense vs p-MoD on a synthetic VQA task; accuracy and cost"),
    "flops": ("pmod.recipes.flops", "analytic FLOPs and KV-cache bytes of dense vs a routing method"),
    "train": ("pmod.recipes.train", "stage-1 (projector) / stage-2 (routed finetune) training on the HF Trainer"),
    "generate": ("pmod.recipes.generate", "answer prompts about images with a model folder (streams; batches)"),
    "viz": ("pmod.recipes.viz", "plot which vision tokens each routed layer keeps for an image"),
    "ablate": ("pmod.experiments.ablate", "the papers' ablations on the built-in task, with seeds and spread"),
    "eval": ("pmod.recipes.eval", "evaluate models with lmms-eval: each task's metric next to TFLOPs, KV and latency"),
    "arank": ("pmod.recipes.arank", "per-layer attention rank (gamma-MoD's ARank) of a model on LLaVA samples"),
    "import-llava": ("pmod.recipes.import_llava", "turn an original LLaVA / p-MoD checkpoint into a pmod folder"),
    "data": ("pmod.recipes.data", "LLaVA-format data: synth (make a synthetic VQA set), check (find bad records)"),
}

def top_parser() -> CommandParser:
    parser = CommandParser(prog="pmod", description="Mixture-of-Depths multimodal LLMs (p-MoD and kin).",
                           allow_abbrev=False)  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        top_parser().print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from pmod import __version__

        print(f"pmod {__version__}")
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        hint = f"did you mean `pmod {close[0]}`?" if close else f"choose one of {', '.join(SUBCOMMANDS)}"
        print(f"pmod: error: unknown command {name!r}; {hint}", file=sys.stderr)
        return 2
    module_name, help_text = SUBCOMMANDS[name]
    parser = CommandParser(prog=f"pmod {name}", description=help_text, allow_abbrev=False)
    module = importlib.import_module(module_name)
    module.add_arguments(parser)
    try:
        args = parser.parse_args([dashed(token) for token in argv[1:]])
    except SystemExit as stop:  # --help, or a flag error already printed
        return int(stop.code or 0)
    args.command = name
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"pmod {name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
