"""Old names kept for one release: they still resolve, with a ``DeprecationWarning`` that names the new one.

Light on purpose (no torch): ``pmod/__init__.py`` uses it before anything else is imported.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is a deprecated name of ``new`` (a module attribute, a keyword, a method)."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}.", DeprecationWarning,
                  stacklevel=stacklevel)  # fmt: skip


def renamed_attributes(module: str, renamed: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` (PEP 562) under which each old name of ``renamed`` (old -> new) resolves to
    the module's new name, with a warning. Old names are not cached in the module, so every use warns."""

    def __getattr__(name: str) -> Any:
        if name not in renamed:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warn_renamed(f"{module}.{name}", f"{module}.{renamed[name]}")
        return getattr(sys.modules[module], renamed[name])

    return __getattr__
