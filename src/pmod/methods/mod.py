"""Vanilla Mixture-of-Depths (Raposo et al., 2024) on the vision tokens, as the p-MoD paper's baseline runs it.

A constant ratio of vision tokens per routed layer, chosen by a ``Linear(hidden, 1)`` router; the raw logit ``w``
(no bound) weights the MLP branch of kept tokens as ``w~ = w + 1`` (the original code's ``none`` norm), so that an
untrained zero router leaves those tokens as the base model computes them. Skipped tokens pass unchanged.

Unbounded weights can overflow in training (p-MoD supplementary C.2); ``pmod train`` counts non-finite losses and
skips those steps instead of crashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Literal

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.methods.vision_router import VisionRouterRule


@register_method
@dataclass
class MoDConfig(MethodConfig):
    """Settings of vanilla MoD.

    Attributes:
        ratio: share of each row's vision tokens a routed layer processes.
        layers: ``"deep_all"`` (layers 2 to L-2, the original code's default), ``"interleave"`` (odd layers) or a
            list of layer indices.
        router_bias: whether the ``Linear(hidden, 1)`` router has a bias.
    """

    method: ClassVar[str] = "mod"
    display_name: ClassVar[str] = "MoD"
    paper: ClassVar[str] = "Mixture-of-Depths: Dynamically allocating compute in transformer-based LMs (2024)"
    listing_order: ClassVar[int] = 1

    ratio: float = field(default=0.5, metadata={"help": "share of vision tokens a routed layer processes"})
    layers: Literal["deep_all", "interleave"] | list[int] = field(
        default="deep_all", metadata={"help": "deep_all (layers 2..L-2), interleave (odd layers) or e.g. 2,4,6"}
    )
    router_bias: bool = field(default=True, metadata={"help": "the Linear(hidden, 1) router has a bias"})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"MoD ratio {self.ratio} is outside (0, 1]; choose a ratio in (0, 1].")
        if isinstance(self.layers, str) and self.layers not in ("deep_all", "interleave"):
            raise ValueError(f"Unknown MoD layer set {self.layers!r}; use 'deep_all', 'interleave' or a list.")

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("ratio", 1e-6, 1.0)

    def describe(self, num_layers: int) -> str:
        where = self.layers if isinstance(self.layers, str) else f"layers {self.layers}"
        return f"MoD constant {self.ratio} on {where}"

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        chosen = schedules.layer_set(self.layers, num_layers)
        return schedules.validate_schedule(schedules.constant_schedule(num_layers, self.ratio, chosen), num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        return [
            LayerPlan() if r is None else LayerPlan(ratio=r, router_outputs=1) for r in self.layer_ratios(num_layers)
        ]

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, VisionRouterRule]:
        import functools

        from pmod.methods.vision_router import VisionRouterRule, build_vision_routers  # torch: only when building

        rule = functools.partial(VisionRouterRule, activation="none", scale=1.0, bias=1.0, string=False)
        return build_vision_routers(layers, self.layer_ratios(len(layers)), self.router_bias, rule)
