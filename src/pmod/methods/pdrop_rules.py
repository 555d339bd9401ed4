"""PyramidDrop at run time: each stage's boundary layer ranks the vision tokens still kept by its last token's
attention, and the stage's layers keep the top of them (the settings are :class:`pmod.methods.pdrop.PDropConfig`)."""

from __future__ import annotations

import torch
from torch import nn

from pmod.core.plan import VISION
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule
from pmod.methods.fastv_rules import last_token_attention

#: ``inputs.shared`` key: stage -> (ranking scores [B, T, 1], recorded weights [B, T]) of the current forward.
STAGES = "pdrop_stages"


class PDropRule(RoutingRule):
    """A layer of stage ``stage`` (1, 2, ...): keeps ``floor(n_vision * ratio)`` vision tokens. The stage's
    boundary layer ranks them; every layer of the stage shares that ranking (and so, in the plan, one selection).

    ``previous`` is the ratio of the stage before (1.0 for stage 1): the boundary ranks only the tokens it kept.
    """

    rounding = "floor"

    def __init__(self, stage: int, ratio: float, previous: float, boundary: bool) -> None:
        self.stage, self.ratio, self.previous, self.boundary = stage, float(ratio), float(previous), boundary

    def route(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RouteDecision | None:
        if inputs.vision_mask is None:
            return None  # text only (decode steps): every token, against the pruned cache
        stages = inputs.shared.setdefault(STAGES, {})
        if self.boundary:
            with torch.no_grad():
                stages[self.stage] = self._rank(layer, hidden, inputs, position_embeddings, stages)
        if self.stage not in stages:
            raise RuntimeError(f"PyramidDrop's stage {self.stage} ranking is missing: its boundary layer did not run.")
        scores, weights = stages[self.stage]
        return RouteDecision(scores=scores, candidates=VISION, candidate_mask=lambda: inputs.vision_mask,
                             weights=weights)  # fmt: skip

    def _rank(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        stages: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [B, T, 1], weights [B, T]): the last token's attention over the tokens the previous stage kept;
        scores are -inf on the vision tokens an earlier stage dropped, so this stage keeps a subset of them."""
        real = inputs.real_mask(hidden)
        kept = None
        if self.stage > 1:
            kept = self._kept_before(inputs, stages[self.stage - 1][0], real)
        probs = last_token_attention(layer, hidden, real, position_embeddings, keys=kept)
        if kept is None:
            return probs[..., None], probs
        dropped = inputs.vision_mask & ~kept
        return probs.masked_fill(dropped, float("-inf"))[..., None], probs.masked_fill(dropped, 0.0)

    def _kept_before(self, inputs: RoutingInputs, scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Bool [B, T]: the tokens the previous stage processed (the plan's shared selection, no new sort)."""
        selection = inputs.plan.select(VISION, lambda: inputs.vision_mask, scores, self.previous, self.rounding)
        if selection is None:
            return real
        index = selection.index[..., 0]
        valid = torch.ones_like(index, dtype=torch.bool) if selection.valid is None else selection.valid[..., 0]
        return torch.zeros_like(real).scatter(1, index, valid)
