"""The per-layer ratios of :mod:`pmod.testing.reference`, computed again from the papers' formulas and the choices a
test writes into a config, with the papers' constants passed in (``paper``: the reference's ``PAPER`` settings, or
what the test declared); nothing is read from ``pmod.core`` or ``pmod.methods``. Layer 0 is always dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

#: MoD's ``deep_all`` layer set: layers 2 to L-2 (the original MoD code's default).
MOD_DEEP_ALL = (2, -1)


def _pmod_ratios(cfg: Any, n: int, paper: Mapping[str, Any]) -> list[float | None]:
    if cfg.schedule == "explicit":
        return list(cfg.ratios)
    if cfg.schedule == "constant":
        chosen = set(range(1, n) if cfg.layers is None else cfg.layers)
        return [cfg.ratio if i in chosen else None for i in range(n)]
    shape = (lambda i: 0.5 * math.cos(math.pi * i / (n - 1))) if cfg.schedule == "prd" else (
        lambda i: 0.5 - i / (n - 1))  # fmt: skip
    raw = [shape(i) + paper["beta"] for i in range(n)]
    return [None if i == 0 or r >= paper["max_ratio"] else max(r, paper["min_ratio"]) for i, r in enumerate(raw)]


def _mod_ratios(cfg: Any, n: int, paper: Mapping[str, Any]) -> list[float | None]:
    first, last = MOD_DEEP_ALL
    named = {"deep_all": range(first, n + last), "interleave": range(1, n, 2)}
    chosen = set(named[cfg.layers] if isinstance(cfg.layers, str) else cfg.layers)
    return [cfg.ratio if i in chosen else None for i in range(n)]


def _gamma_mod_ratios(cfg: Any, n: int, paper: Mapping[str, Any]) -> list[float | None]:
    chosen = cfg.layers
    if isinstance(chosen, str):  # "arank": below the threshold_rank-th largest value, layer 0 dense
        limit = sorted(cfg.arank, reverse=True)[paper["threshold_rank"] - 1]
        chosen = [i for i, v in enumerate(cfg.arank) if v < limit and i != 0]
    return [1.0 - cfg.skip_ratio if i in set(chosen) else None for i in range(n)]


def _fastv_ratios(cfg: Any, n: int, paper: Mapping[str, Any]) -> list[float | None]:
    return [None] * paper["layer"] + [paper["keep"]] * (n - paper["layer"])


#: Per method (by its registry name, kept here and not in pmod's method registry, whose code is what these check):
#: the per-layer ratios (None = dense) of a config for ``n`` layers.
RATIOS: dict[str, Callable[[Any, int, Mapping[str, Any]], list[float | None]]] = {
    "pmod": _pmod_ratios,
    "mod": _mod_ratios,
    "gamma_mod": _gamma_mod_ratios,
    "fastv": _fastv_ratios,
}
