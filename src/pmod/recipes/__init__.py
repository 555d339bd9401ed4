"""Recipes: the commands (train, generate, demo, viz, flops, data), each composing the components below it.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``; ``pmod.cli`` is the table of them.
"""
