"""Which function a mutmut mutant is in, and that function's source, to tell whether an older measurement of it
still describes the current code (``run_mutation.py --previous``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Modules renamed since older work copies were measured (current name -> name there), so that ``--previous`` finds
#: their results: a function whose source is unchanged keeps its mutants' numbers under the new module name.
RENAMED = {"pmod.analysis.analytic_flops": "pmod.analysis.flops", "pmod.methods.gamma_arank": "pmod.methods.arank"}


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


def names_before(name: str, source: str) -> list[tuple[str, str]]:
    """(mutant name, source file) under which an older work copy may hold mutant ``name`` of ``source``: as they
    are, then under the module's name before a rename (``RENAMED``)."""
    found = [(name, source)]
    for new, old in RENAMED.items():
        if name.startswith(new + ".x"):
            path = source.replace(new.replace(".", "/") + ".py", old.replace(".", "/") + ".py")
            found.append((old + name[len(new) :], path))
    return found


def module_of(mutant: str) -> str:
    """``pmod.core.schedules.x_kept_count__mutmut_3`` -> ``pmod.core.schedules``."""
    return mutant.split(".x")[0]


def short_args(argv: list[str], most: int = 12) -> list[str]:
    """The command line as recorded in runs.json: a long list of mutant names (the not-yet-run mutants of some
    functions, passed by name so that mutmut does not run the finished ones again) becomes a count per module."""
    names = [a for a in argv if ".x" in a and not a.startswith("-")]
    if len(names) <= most:
        return argv
    modules: dict[str, int] = {}
    for name in names:
        modules[module_of(name)] = modules.get(module_of(name), 0) + 1
    listed = ", ".join(f"{n} of {m}" for m, n in sorted(modules.items()))
    summary = f"<{len(names)} mutant names: {listed}>"
    first = argv.index(names[0])
    return [a for a in argv[:first] if a not in names] + [summary] + [a for a in argv[first:] if a not in names]
