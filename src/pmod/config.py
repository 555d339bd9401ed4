"""PModConfig: every p-MoD setting, serialised into the model's config.json under the key ``pmod``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pmod import schedule as sched

ScheduleKind = Literal["prd", "linear", "constant", "explicit"]
WeightNorm = Literal["tanh", "sigmoid", "none"]

# (scale, bias) of w~ = scale * act(logit) + bias when the user leaves them unset.
_NORM_DEFAULTS = {"tanh": (0.2, 1.0), "sigmoid": (1.0, 0.5), "none": (1.0, 0.0)}


@dataclass
class PModConfig:
    """Settings of a p-MoD model. The defaults are the paper's (PRD, TanhNorm alpha 0.2, STRing on).

    Attributes:
        schedule: ``"prd"`` (cosine decay), ``"linear"`` (shifted-linear decay), ``"constant"`` (``ratio`` on
            ``layers``; vanilla MoD) or ``"explicit"`` (``ratios``, one entry per layer, None = dense).
        beta, max_ratio, min_ratio: PRD/linear shift and thresholds; ratios >= ``max_ratio`` stay dense,
            ratios <= ``min_ratio`` are clamped to ``min_ratio``.
        ratio, layers: constant schedule; ``layers=None`` means every layer but layer 0.
        ratios: explicit per-layer schedule.
        weight_norm: how a router logit becomes the token weight ``w~ = scale * act(logit) + bias``:
            ``"tanh"`` (TanhNorm), ``"sigmoid"`` or ``"none"`` (identity, the raw logit as in the original MoD).
        weight_scale, weight_bias: ``scale`` and ``bias`` above; None takes the norm's default
            (tanh: 0.2 and 1.0, sigmoid: 1.0 and 0.5, none: 1.0 and 0.0).
        string: symmetric token reweighting; skipped vision tokens become ``w~ * x``. Off: they pass unchanged.
        router_bias: whether the ``Linear(hidden, 1)`` router has a bias.
    """

    schedule: ScheduleKind = "prd"
    beta: float = 0.5
    max_ratio: float = 0.85
    min_ratio: float = 0.15
    ratio: float = 0.5
    layers: list[int] | None = None
    ratios: list[float | None] | None = None
    weight_norm: WeightNorm = "tanh"
    weight_scale: float | None = None
    weight_bias: float | None = None
    string: bool = True
    router_bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schedule not in ("prd", "linear", "constant", "explicit"):
            raise ValueError(
                f"Unknown p-MoD schedule {self.schedule!r}; choose 'prd', 'linear', 'constant' or 'explicit'."
            )
        if self.weight_norm not in _NORM_DEFAULTS:
            raise ValueError(f"Unknown weight_norm {self.weight_norm!r}; choose 'tanh', 'sigmoid' or 'none'.")
        if self.schedule == "explicit" and self.ratios is None:
            raise ValueError("schedule='explicit' needs `ratios`: one ratio (or None for dense) per layer.")
        if self.schedule == "constant" and not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"Constant ratio {self.ratio} is outside (0, 1]; choose a ratio in (0, 1].")
        if not (0.0 < self.min_ratio <= 1.0):
            raise ValueError(f"min_ratio {self.min_ratio} is outside (0, 1]; choose a value in (0, 1].")
        if self.max_ratio <= self.min_ratio:
            raise ValueError(f"max_ratio ({self.max_ratio}) must be larger than min_ratio ({self.min_ratio}).")

    @property
    def scale(self) -> float:
        return _NORM_DEFAULTS[self.weight_norm][0] if self.weight_scale is None else self.weight_scale

    @property
    def bias(self) -> float:
        return _NORM_DEFAULTS[self.weight_norm][1] if self.weight_bias is None else self.weight_bias

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        """Per-layer retention ratios for a model with ``num_layers`` decoder layers (None = dense layer)."""
        if self.schedule == "prd":
            ratios = sched.prd_schedule(num_layers, self.beta, self.max_ratio, self.min_ratio)
        elif self.schedule == "linear":
            ratios = sched.linear_schedule(num_layers, self.beta, self.max_ratio, self.min_ratio)
        elif self.schedule == "constant":
            ratios = sched.constant_schedule(num_layers, self.ratio, self.layers)
        else:
            ratios = list(self.ratios)
        return sched.validate_schedule(ratios, num_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PModConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"Unknown p-MoD config keys {sorted(unknown)}; this pmod version knows {sorted(known)}. "
                f"Upgrade pmod or remove the keys from config.json."
            )
        return cls(**data)
