"""The package's shape: no module imports another module's private names, and no file grows past what one reader
holds (the import direction itself is checked by import-linter in CI, see pyproject's ``[tool.importlinter]``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "pmod").rglob("*.py"))
CHECKED = SOURCES + sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
MAX_LINES = 450


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
