"""Per-layer retention ratios (pure functions).

A retention ratio ``R_l`` in (0, 1] says which share of a sample's routable (vision) tokens layer ``l`` processes:
``k = floor(R_l * n_vision)``. ``None`` marks a dense layer (an ordinary decoder layer, no router).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

#: The first layer a schedule may route. Layer 0 stays dense: transformers sizes attention masks and position ids
#: from layer 0's cache, so it must process (and cache) every token. Every schedule and layer choice reads it here.
FIRST_ROUTABLE_LAYER = 1


def routable_layers(num_layers: int) -> range:
    """The layers a method may route: every layer from :data:`FIRST_ROUTABLE_LAYER` on."""
    return range(FIRST_ROUTABLE_LAYER, num_layers)


def prd_ratio(layer: int, num_layers: int, beta: float = 0.5) -> float:
    """Progressive ratio decay before thresholds: ``0.5 * cos(pi * l / (L - 1)) + beta``."""
    if num_layers < 2:
        return 0.5 + beta
    return 0.5 * math.cos(math.pi * layer / (num_layers - 1)) + beta


def linear_ratio(layer: int, num_layers: int, beta: float = 0.5) -> float:
    """Shifted linear decay before thresholds: ``0.5 - l / (L - 1) + beta``."""
    if num_layers < 2:
        return 0.5 + beta
    return 0.5 - layer / (num_layers - 1) + beta


def _thresholded(raw: Sequence[float], max_ratio: float, min_ratio: float) -> list[float | None]:
    # Layers at or above `max_ratio` stay dense; the tail is clamped so no layer drops (almost) every token. Layer 0
    # stays dense whatever its ratio (see `validate_schedule`): with beta below 0.35 PRD would route it.
    first = FIRST_ROUTABLE_LAYER
    return [None if i < first or r >= max_ratio else max(r, min_ratio) for i, r in enumerate(raw)]


def prd_schedule(
    num_layers: int, beta: float = 0.5, max_ratio: float = 0.85, min_ratio: float = 0.15
) -> list[float | None]:
    """The p-MoD PRD schedule: ``R_l = 0.5 cos(pi l / (L-1)) + beta``, dense at or above ``max_ratio``, clamped at
    ``min_ratio``; layer 0 always dense.

    For 32 layers and the defaults, layers 0-7 are dense, ``R_8 = 0.8445`` and the last layers sit at 0.15.
    """
    return _thresholded([prd_ratio(i, num_layers, beta) for i in range(num_layers)], max_ratio, min_ratio)


def linear_schedule(
    num_layers: int, beta: float = 0.5, max_ratio: float = 0.85, min_ratio: float = 0.15
) -> list[float | None]:
    """The shifted-linear ablation of PRD (``R_l = 0.5 - l / (L-1) + beta``), with the same thresholds."""
    return _thresholded([linear_ratio(i, num_layers, beta) for i in range(num_layers)], max_ratio, min_ratio)


def constant_schedule(num_layers: int, ratio: float, layers: Sequence[int] | None = None) -> list[float | None]:
    """One ratio on the chosen layers (vanilla MoD); every other layer dense.

    ``layers=None`` routes every layer but layer 0, which must stay dense (see :func:`validate_schedule`).
    """
    chosen = set(routable_layers(num_layers) if layers is None else layers)
    return [ratio if i in chosen else None for i in range(num_layers)]


def retention(schedule: Sequence[float | None]) -> list[float]:
    """Ratios with dense layers as 1.0."""
    return [1.0 if r is None else float(r) for r in schedule]


def mean_retention(schedule: Sequence[float | None]) -> float:
    """Mean share of vision tokens processed over all layers (dense layers count as 1)."""
    values = retention(schedule)
    return math.fsum(values) / len(values)


def kept_count(n_vision: int, ratio: float | None, rounding: str = "floor") -> int:
    """Number of vision tokens a layer with this ratio processes: ``floor(n_vision * ratio)``, or with
    ``rounding="round"`` the nearest integer (halves to even, as Python's and torch's ``round``)."""
    if ratio is None:
        return n_vision
    if rounding == "round":
        return round(n_vision * ratio)
    return math.floor(n_vision * ratio)


def validate_schedule(schedule: Sequence[float | None], num_layers: int) -> list[float | None]:
    """Check a per-layer schedule and return it as a list; raise ``ValueError`` naming the fix."""
    schedule = list(schedule)
    if len(schedule) != num_layers:
        raise ValueError(
            f"The routing schedule has {len(schedule)} entries but the model has {num_layers} decoder layers; "
            f"give exactly one ratio (or None for a dense layer) per layer."
        )
    for i, r in enumerate(schedule):
        if r is None:
            continue
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < float(r) <= 1.0):
            raise ValueError(
                f"Retention ratio {r!r} for layer {i} is outside (0, 1]; use a ratio in (0, 1] "
                f"or None to keep the layer dense."
            )
    if any(r is not None for r in schedule[:FIRST_ROUTABLE_LAYER]):
        raise ValueError(
            "Layer 0 cannot be a routed layer: transformers sizes attention masks and position ids from the "
            "cache of layer 0, so it must process (and cache) every token. Set the ratio of layer 0 to None."
        )
    return schedule


def layer_set(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """The layers a named set stands for: ``"deep_all"`` (layers 2 to L-2, the original MoD code's choice),
    ``"interleave"`` (the odd layers), ``"all"`` (every layer but 0), or an explicit list of indices."""
    if isinstance(spec, str):
        if spec == "deep_all":
            return list(range(2, num_layers - 1))
        if spec == "interleave":
            return list(range(1, num_layers, 2))
        if spec == "all":
            return list(routable_layers(num_layers))
        raise ValueError(f"Unknown layer set {spec!r}; use 'deep_all', 'interleave', 'all' or a list of layer indices.")
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"Layer indices {bad} are outside 0..{num_layers - 1}; the model has {num_layers} layers.")
    return layers
