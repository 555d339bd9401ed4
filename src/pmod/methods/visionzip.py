"""VisionZip (Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language Models";
github.com/dvlab-research/VisionZip): each image's vision tokens reduced to a few before the decoder.

Per image, on the tower layer whose output feeds the projector (LLaVA's ``vision_feature_layer``, -2): the
``dominant`` tokens are the [CLS] token and the ``dominant - 1`` patches the [CLS] token attends to most (its
attention in that layer, summed over heads); of the other patches, ``contextual`` at a uniform stride are targets,
and every remaining patch is merged into the target its key is most similar to (keys averaged over heads, normalised,
dot product): a target becomes itself plus the mean of the patches merged into it. The decoder gets the dominant
tokens in position order, then the contextual ones, in place of the image's placeholders: a shorter sequence,
numbered consecutively, so every decoder layer and the KV cache see ``dominant + contextual`` tokens per image.
Training-free; no decoder layer is routed. The run-time rule is in :mod:`pmod.methods.visionzip_rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

#: The high end of the budget knob: more dominant tokens than any image has (the cost is dense's there).
MAX_DOMINANT = 1_000_000


#: The tokens of one view of LLaVA's CLIP-336 tower (24 x 24 patches): the analytic cost counts a sample's views
#: as ``ceil(n_vision / VIEW_TOKENS)`` (LLaVA-1.5: one per image; LLaVA-NeXT's 2880 = 5 views).
VIEW_TOKENS = 576


@dataclass(frozen=True)
class ReducedInputPlan(LayerPlan):
    """A dense :class:`LayerPlan` of a layer that receives ``kept`` vision tokens per view of a sample (the sequence
    was shortened before the decoder), for the analytic cost (``pmod.analysis.analytic_flops``)."""

    kept: int = 0
    view_tokens: int = VIEW_TOKENS

    def vision_tokens(self, n_vision: int) -> int:
        """Vision tokens per sample that reach the layer: ``kept`` per view, at most ``n_vision``."""
        return min(n_vision, self.kept * max(1, math.ceil(n_vision / self.view_tokens)))


@register_method
@dataclass
class VisionZipConfig(MethodConfig):
    """Settings of VisionZip.

    Attributes:
        dominant: tokens kept per image by the [CLS] attention, the [CLS] token included (the paper's 54 of 576 =
            [CLS] + 53 patches). A float is rounded to whole tokens (``pmod.at_budget`` searches on it).
        contextual: tokens per image merged from the rest by key similarity (the paper's 10).
    """

    method: ClassVar[str] = "visionzip"
    display_name: ClassVar[str] = "VisionZip"
    paper: ClassVar[str] = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR 2025)"
    listing_order: ClassVar[int] = 6
    trainable: ClassVar[bool] = False
    routes_layers: ClassVar[bool] = False

    dominant: int = field(default=54, metadata={"help": "tokens kept per image by [CLS] attention ([CLS] included)"})
    contextual: int = field(default=10, metadata={"help": "tokens per image merged from the rest by key similarity"})

    def __post_init__(self) -> None:
        if isinstance(self.dominant, float):
            self.dominant = round(self.dominant)
        if self.dominant < 1 or self.contextual < 0:
            raise ValueError(f"VisionZip needs dominant >= 1 (the [CLS] token counts as one) and contextual >= 0, "
                             f"got {self.dominant} and {self.contextual}.")  # fmt: skip

    @property
    def kept(self) -> int:
        """Tokens the decoder gets per image."""
        return self.dominant + self.contextual

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("dominant", 1.0, float(MAX_DOMINANT))

    def describe(self, num_layers: int) -> str:
        return f"VisionZip {self.dominant} dominant + {self.contextual} contextual tokens per image"

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        return [None] * num_layers

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        return [ReducedInputPlan(kept=self.kept) for _ in range(num_layers)]

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, Any]:
        return {}

    def attach(self, model: nn.Module, adapter: Any) -> None:
        from pmod.methods.visionzip_rules import attach_visionzip  # torch: only when a model is built

        attach_visionzip(model, adapter, self.dominant, self.contextual)
