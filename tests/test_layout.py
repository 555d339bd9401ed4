"""The package's shape: no module imports another module's private names, no file grows past what one reader
holds, and no function past what one reader follows in one go (the import direction itself is checked by
import-linter in CI, see pyproject's ``[tool.importlinter]``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "pmod").rglob("*.py"))
CHECKED = SOURCES + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
MAX_LINES = 450
#: A function's lines, signature and docstring included (``end_lineno - lineno + 1``; decorators not counted).
MAX_FUNCTION_LINES = 60


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT / "src") if "src" in path.parts else None
    return "" if rel is None else ".".join(rel.with_suffix("").parts).removesuffix(".__init__")


def private_imports(path: Path) -> list[str]:
    """``from pmod.x import _name`` and ``pmod.x._name`` uses in ``path`` where ``pmod.x`` is another module."""
    own = _module_of(path)
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pmod") and node.level == 0:
            if node.module != own:
                found += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "pmod":
                found.append(f"{path.name}:{node.lineno} pmod.{'.'.join(reversed(chain))}")
    return found


def test_no_private_names_across_modules() -> None:
    found = [hit for path in CHECKED for hit in private_imports(path)]
    assert not found, found


def test_private_name_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from pmod.experiments.demo import _image\nimport pmod\npmod.core.routed_layer._ROUTED_CLASSES\n")
    assert len(private_imports(bad)) == 2


def test_no_file_is_two_things() -> None:
    long = {
        path.relative_to(ROOT).as_posix(): n
        for path in SOURCES
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these where the seam is: {long}"


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``file:qualified.name -> lines`` for every function or method in ``path`` longer than ``limit`` lines."""
    found = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef) and (n := child.end_lineno - child.lineno + 1) > limit:
                    found[f"{path.name}:{prefix}{child.name}"] = n
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def test_no_function_is_two_steps() -> None:
    long = {f"{path.parent.name}/{name}": n for path in SOURCES for name, n in long_functions(path).items()}
    assert not long, f"split these into named steps: {long}"


def test_function_cap_can_fail(tmp_path: Path) -> None:
    """A function of exactly the cap passes; one a line longer fails, as does a method and a function inside one."""
    fits = "def fits():\n" + "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))
    long = "def long():\n" + "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    nested = "class A:\n    def method(self):\n        def inner():\n" + "".join(
        f"            y{i} = {i}\n" for i in range(MAX_FUNCTION_LINES)) + "        return inner\n"  # fmt: skip
    path = tmp_path / "probe.py"
    path.write_text(f"{fits}\n\n{long}\n\n{nested}")
    assert long_functions(path) == {"probe.py:long": MAX_FUNCTION_LINES + 1,
                                    "probe.py:A.method": MAX_FUNCTION_LINES + 3,
                                    "probe.py:A.method.inner": MAX_FUNCTION_LINES + 1}  # fmt: skip
