"""p-MoD (Zhang et al., ICCV 2025): TanhNorm, STRing and progressive ratio decay (PRD) on vision tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.methods.vision_router import VisionRouterRule

ScheduleKind = Literal["prd", "linear", "constant", "explicit"]
WeightNorm = Literal["tanh", "sigmoid", "none"]

#: (scale, bias) of w~ = scale * act(logit) + bias when the user leaves them unset.
NORM_DEFAULTS = {"tanh": (0.2, 1.0), "sigmoid": (1.0, 0.5), "none": (1.0, 0.0)}


@register_method
@dataclass
class PModConfig(MethodConfig):
    """Settings of a p-MoD model. The defaults are the paper's (PRD, TanhNorm alpha 0.2, STRing on).

    Attributes:
        schedule: ``"prd"`` (cosine decay), ``"linear"`` (shifted-linear decay), ``"constant"`` (``ratio`` on
            ``layers``) or ``"explicit"`` (``ratios``, one entry per layer, None = dense).
        beta, max_ratio, min_ratio: PRD/linear shift and thresholds; ratios >= ``max_ratio`` stay dense,
            ratios <= ``min_ratio`` are clamped to ``min_ratio``.
        ratio, layers: constant schedule; ``layers=None`` means every layer but layer 0.
        ratios: explicit per-layer schedule.
        weight_norm: how a router logit becomes the token weight ``w~ = scale * act(logit) + bias``:
            ``"tanh"`` (TanhNorm), ``"sigmoid"`` or ``"none"`` (identity, the raw logit).
        weight_scale, weight_bias: ``scale`` and ``bias`` above; None takes the norm's default
            (tanh: 0.2 and 1.0, sigmoid: 1.0 and 0.5, none: 1.0 and 0.0).
        string: symmetric token reweighting; skipped vision tokens become ``w~ * x``. Off: they pass unchanged.
        router_bias: whether the ``Linear(hidden, 1)`` router has a bias.
    """

    method: ClassVar[str] = "pmod"
    display_name: ClassVar[str] = "p-MoD"
    paper: ClassVar[str] = "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay (ICCV 2025)"
    listing_order: ClassVar[int] = 0

    schedule: ScheduleKind = field(default="prd", metadata={"help": "prd, linear, constant or explicit"})
    beta: float = field(default=0.5, metadata={"help": "PRD/linear shift: R_l = 0.5 cos(pi l / (L-1)) + beta"})
    max_ratio: float = field(default=0.85, metadata={"help": "layers with R_l >= this stay dense"})
    min_ratio: float = field(default=0.15, metadata={"help": "R_l <= this is clamped to it"})
    ratio: float = field(default=0.5, metadata={"help": "ratio of the constant schedule"})
    layers: list[int] | None = field(default=None, metadata={"help": "constant schedule layers, e.g. 1,2,3"})
    ratios: list[float | None] | None = field(
        default=None, metadata={"help": "explicit per-layer ratios, e.g. none,0.5,0.5 (none = dense)"}
    )
    weight_norm: WeightNorm = field(default="tanh", metadata={"help": "tanh (TanhNorm), sigmoid or none"})
    weight_scale: float | None = field(default=None, metadata={"help": "w~ = scale*act(w)+bias; default per norm"})
    weight_bias: float | None = field(default=None, metadata={"help": "w~ = scale*act(w)+bias; default per norm"})
    string: bool = field(default=True, metadata={"help": "STRing: skipped vision tokens become w~ * x"})
    router_bias: bool = field(default=True, metadata={"help": "the Linear(hidden, 1) router has a bias"})

    def __post_init__(self) -> None:
        if self.schedule not in ("prd", "linear", "constant", "explicit"):
            raise ValueError(
                f"Unknown p-MoD schedule {self.schedule!r}; choose 'prd', 'linear', 'constant' or 'explicit'."
            )
        if self.weight_norm not in NORM_DEFAULTS:
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
        return NORM_DEFAULTS[self.weight_norm][0] if self.weight_scale is None else self.weight_scale

    @property
    def bias(self) -> float:
        return NORM_DEFAULTS[self.weight_norm][1] if self.weight_bias is None else self.weight_bias

    def budget_knob(self) -> tuple[str, float, float] | None:
        # PRD/linear shift every ratio by beta: at -1 every routed layer is clamped to min_ratio, at 1.5 every layer
        # is at max_ratio or above (dense). The constant schedule moves its one ratio; an explicit one has no knob.
        return {"prd": ("beta", -1.0, 1.5), "linear": ("beta", -1.0, 1.5), "constant": ("ratio", 1e-6, 1.0)}.get(
            self.schedule
        )

    def describe(self, num_layers: int) -> str:
        if self.schedule in ("prd", "linear"):
            return f"p-MoD {self.schedule} (beta {self.beta}, max ratio {self.max_ratio}, min ratio {self.min_ratio})"
        return f"p-MoD constant {self.ratio}" if self.schedule == "constant" else "p-MoD explicit"

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        """Per-layer retention ratios for a model with ``num_layers`` decoder layers (None = dense layer)."""
        if self.schedule == "prd":
            ratios = schedules.prd_schedule(num_layers, self.beta, self.max_ratio, self.min_ratio)
        elif self.schedule == "linear":
            ratios = schedules.linear_schedule(num_layers, self.beta, self.max_ratio, self.min_ratio)
        elif self.schedule == "constant":
            ratios = schedules.constant_schedule(num_layers, self.ratio, self.layers)
        else:
            ratios = list(self.ratios)
        return schedules.validate_schedule(ratios, num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        return [
            LayerPlan() if r is None else LayerPlan(ratio=r, router_outputs=1) for r in self.layer_ratios(num_layers)
        ]

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, VisionRouterRule]:
        import functools

        from pmod.methods.vision_router import VisionRouterRule, build_vision_routers  # torch: only when building

        rule = functools.partial(VisionRouterRule, activation=self.weight_norm, scale=self.scale, bias=self.bias,
                                 string=self.string)  # fmt: skip
        return build_vision_routers(layers, self.layer_ratios(len(layers)), self.router_bias, rule)
