"""Which function a mutmut mutant is in, and that function's source, to tell whether an older measurement of it
still describes the current code (``run_mutation.py --previous``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _functions(source: str) -> dict[str, str]:
    """Every function's and method's source in a module, by mutmut's name for it (``x_f``, ``xǁClassǁmethod``)."""
    found = {}
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[f"x_{node.name}"] = ast.get_source_segment(source, node) or ""
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"x\u01c1{node.name}\u01c1{item.name}"] = ast.get_source_segment(source, item) or ""
    return found


def function_source(root: Path, source: str, cache: dict) -> dict[str, str]:
    """The functions of ``root/source`` (a work copy's pragma marks taken off), read once into ``cache``."""
    key = (root, source)
    if key not in cache:
        path = root / source
        text = path.read_text().replace("  # pragma: no mutate", "") if path.exists() else ""
        cache[key] = _functions(text) if text else {}
    return cache[key]


def function_of(name: str) -> str:
    """``pmod.core.plan.xǁForwardPlanǁselect__mutmut_3`` -> ``xǁForwardPlanǁselect``."""
    return "x" + name.split(".x", 1)[1].rsplit("__mutmut_", 1)[0]


def gap_summary(names: list[str]) -> dict[str, int]:
    """Mutants per function, for the report's lists of stale and unmeasured code."""
    counts: dict[str, int] = {}
    for name in names:
        function = function_of(name)
        label = function[2:] if function.startswith("x_") else function[1:].replace("\u01c1", ".").strip(".")
        key = name.split(".x", 1)[0] + "." + label
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
