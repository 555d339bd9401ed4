"""Recipes: the commands (train, generate, viz, flops, eval, arank, import-llava, data), each composing the
components below it. The demo and the ablation are experiments above them (:mod:`pmod.experiments`).

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``pmod.cli`` is the table of them.
"""
