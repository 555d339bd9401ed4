"""pmod's public names are listed once (the lazy table in ``pmod/__init__.py``): ``__all__`` is derived from it, the
``TYPE_CHECKING`` imports that type checkers read name the same objects, and every name resolves."""

from __future__ import annotations

import ast
from pathlib import Path

import pmod

INIT = Path(pmod.__file__)


def type_checking_names() -> dict[str, str]:
    """Name -> the dotted source it comes from, as the ``if TYPE_CHECKING:`` block of ``pmod/__init__.py`` says."""
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    names: dict[str, str] = {}
    for node in block.body:
        if isinstance(node, ast.ImportFrom):
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
        elif isinstance(node, ast.Assign):
            names[node.targets[0].id] = names[node.value.id]
    return names


def test_one_list_of_public_names() -> None:
    exported = set(pmod.EXPORTS)
    assert set(pmod.__all__) == exported | {"__version__"}
    assert set(type_checking_names()) == exported
    for name in exported:
        module, attribute = pmod.EXPORTS[name]
        assert getattr(pmod, name) is getattr(__import__(module, fromlist=[attribute]), attribute), name
        # The TYPE_CHECKING import names the same object (re-exports through pmod.methods included).
        source, _, leaf = type_checking_names()[name].rpartition(".")
        assert getattr(pmod, name) is getattr(__import__(source, fromlist=[leaf]), leaf), name
