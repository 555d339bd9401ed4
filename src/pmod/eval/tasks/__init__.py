"""lmms-eval task configs that ship with pmod: the synthetic shapes set (``pmod data synth``) as ``pmod_shapes``
(generation, exact match of the first answer word) and ``pmod_shapes_mc`` (multiple choice by log-likelihood).

Give lmms-eval this folder as ``--include_path`` (``python -m pmod.eval.tasks`` prints it; ``pmod eval`` adds it
itself). The data folder is ``$PMOD_SHAPES_DIR``, else ``data/shapes`` under the working directory.
"""

from __future__ import annotations

from pathlib import Path

#: The folder of the task YAMLs, for lmms-eval's ``--include_path``.
TASKS_DIR = Path(__file__).resolve().parent
