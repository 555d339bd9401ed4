"""Experiments: the demo (``pmod demo``), the ablation (``pmod ablate``) and the stand-in vision tower's
pre-training they share. They run the library's recipes on the built-in synthetic task and report what they
measure; nothing in the library below imports them.

``demo`` and ``ablate`` are command modules like the recipes (``add_arguments(parser)`` and ``run(args) -> int``);
``pmod.cli`` lists them beside the recipes.
"""
