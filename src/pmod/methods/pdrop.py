"""PyramidDrop (Xing et al., CVPR 2025; github.com/Cooperx521/PyramidDrop): vision tokens dropped stage by stage.

The decoder is split into stages at the boundary layers (LLaVA-1.5 / NeXT: 8, 16, 24). At the boundary layer of
stage ``s``, each row's vision tokens still kept are ranked by the softmax attention its LAST real token pays them in
that layer (from the layer's own q/k and RoPE over its input, mean over heads, the attention restricted to the
tokens still kept), and from that layer on only the top ``floor(n_vision * keep**s)`` stay, ``n_vision`` the row's
vision tokens at the input (the authors' ``int(n * ratio_list[s])``). Retention is 1, keep, keep^2, ... Layers before
the first boundary are dense; dropped tokens pass the later layers unchanged and leave no K/V there. Kept tokens keep
their original positions.

Each stage's selection is over every vision token of the forward: the ranking gives -inf to the tokens an earlier
stage dropped, so a stage keeps a subset of the previous stage's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.core.routed_layer import RoutingRule


@register_method
@dataclass
class PDropConfig(MethodConfig):
    """Settings of PyramidDrop.

    Attributes:
        layers: the stage boundaries, increasing, each >= 1: the vision tokens are ranked and dropped in these
            layers (the paper's 8, 16, 24 for 32-layer models).
        keep: lambda, the share of the still-kept vision tokens each boundary keeps.
    """

    method: ClassVar[str] = "pdrop"
    display_name: ClassVar[str] = "PyramidDrop"
    paper: ClassVar[str] = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy "\
        "Reduction (CVPR 2025)"  # fmt: skip
    listing_order: ClassVar[int] = 4
    # Nothing to train: the rule applies to a dense model as it loads (the paper also fine-tunes with the rule; pmod
    # train does not offer that yet).
    trainable: ClassVar[bool] = False

    layers: list[int] = field(
        default_factory=lambda: [8, 16, 24], metadata={"help": "stage boundaries: the layers that rank and drop"}
    )
    keep: float = field(default=0.5, metadata={"help": "lambda: share of the kept vision tokens each boundary keeps"})

    def __post_init__(self) -> None:
        self.layers = [int(i) for i in self.layers]
        if not self.layers:
            raise ValueError("PyramidDrop needs at least one stage boundary in layers, e.g. 8,16,24.")
        if self.layers[0] < schedules.FIRST_ROUTABLE_LAYER or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ValueError(
                f"PyramidDrop layers {self.layers} must increase and start at 1 or later (layer 0 stays dense)."
            )
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"PyramidDrop keep {self.keep} is outside (0, 1]; choose the share kept per stage.")

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("keep", 1e-6, 1.0)

    def describe(self, num_layers: int) -> str:
        return f"PyramidDrop boundaries {self.layers} keep {self.keep} per stage"

    def stage_ratios(self) -> list[float]:
        """Retention of stage s = 1, 2, ...: ``keep ** s`` of the row's vision tokens."""
        return [self.keep**s for s in range(1, len(self.layers) + 1)]

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        if self.layers[-1] >= num_layers:
            raise ValueError(
                f"PyramidDrop boundary layer {self.layers[-1]} is beyond the model's {num_layers} layers "
                f"(0..{num_layers - 1}); choose --pdrop-layers below {num_layers}."
            )
        ratios: list[float | None] = [None] * num_layers
        ends = [*self.layers[1:], num_layers]
        for start, end, ratio in zip(self.layers, ends, self.stage_ratios(), strict=True):
            ratios[start:end] = [ratio] * (end - start)
        return schedules.validate_schedule(ratios, num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        boundaries = set(self.layers)
        return [
            LayerPlan() if r is None else LayerPlan(ratio=r, scores_last_token=i in boundaries)
            for i, r in enumerate(self.layer_ratios(num_layers))
        ]

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, RoutingRule]:
        from pmod.methods.pdrop_rules import PDropRule  # torch: only when a model is built

        ratios = self.layer_ratios(len(layers))
        stage_of = {b: s for s, b in enumerate(self.layers, start=1)}
        rules: dict[int, RoutingRule] = {}
        stage = 0
        for i, r in enumerate(ratios):
            if r is None:
                continue
            stage = stage_of.get(i, stage)
            previous = 1.0 if stage == 1 else self.stage_ratios()[stage - 2]
            rules[i] = PDropRule(stage, r, previous, boundary=i in stage_of)
        return rules
