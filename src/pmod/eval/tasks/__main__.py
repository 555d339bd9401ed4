"""``python -m pmod.eval.tasks`` prints the folder of pmod's lmms-eval tasks (for ``--include_path``)."""

from pmod.eval.tasks import TASKS_DIR

print(TASKS_DIR)
