"""The per-layer vision-token router that p-MoD and vanilla MoD share.

A ``Linear(hidden, 1)`` router on the layer input scores every vision token; per row the top
``floor(ratio * n_vision)`` vision tokens are processed with every text token. The token weight is
``w~ = scale * act(logit) + bias``: kept vision tokens get ``h + w~ * MLP(LN(h))``, and with STRing skipped vision
tokens become ``w~ * x`` (otherwise they pass unchanged). The methods differ only in ``act``, ``scale``, ``bias``,
STRing and their schedules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pmod.core.compaction import select_tokens
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "none": lambda logits: logits,
}


def make_router(layer: nn.Module, bias: bool) -> nn.Linear:
    """A zero-initialised ``Linear(hidden, 1)`` on the layer's device and dtype, registered as ``layer.router``.

    Zero weights give every token the same logit 0, so ``w~`` is ``scale * act(0) + bias`` for all of them.
    """
    weight = layer.input_layernorm.weight
    router = nn.Linear(weight.shape[-1], 1, bias=bias, device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(router.weight)
    if router.bias is not None:
        nn.init.zeros_(router.bias)
    layer.router = router
    return router


class VisionRouterRule(RoutingRule):
    """Top-k of the vision tokens by a per-layer router's logit; weights ``scale * act(logit) + bias``."""

    def __init__(self, ratio: float, activation: str, scale: float, bias: float, string: bool) -> None:
        self.ratio = float(ratio)
        self.activation, self.scale, self.bias, self.string = activation, scale, bias, string

    def token_weights(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * ACTIVATIONS[self.activation](logits) + self.bias

    def route(
        self, layer: nn.Module, hidden: torch.Tensor, inputs: RoutingInputs, position_embeddings: object = None
    ) -> RouteDecision | None:
        vision = inputs.vision_mask
        # Text-only inference (every decode step): nothing to route, so skip the router and the selection.
        # Training keeps the router in the graph so that data-parallel wrappers see it used in every step.
        if vision is None and layer.pmod_recorder is None and not torch.is_grad_enabled():
            return None
        real = inputs.token_mask
        if vision is None:
            vision = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        elif real is not None:
            vision = vision & real
        logits = layer.router(hidden).squeeze(-1).float()
        weights = self.token_weights(logits)
        kept = select_tokens(logits, vision, self.ratio)
        processed = ~vision | kept
        # Kept vision tokens: only the MLP branch is reweighted. Skipped ones (STRing): w~ * x.
        mlp_scale = torch.where(kept, weights, 1.0)
        skip_scale = torch.where(vision & ~kept, weights, 1.0) if self.string else None
        return RouteDecision(processed, mlp_scale=mlp_scale, skip_scale=skip_scale, weights=weights)


def build_vision_routers(
    layers: nn.ModuleList, ratios: list[float | None], router_bias: bool, rule: Callable[[float], VisionRouterRule]
) -> dict[int, VisionRouterRule]:
    """A zero router and the rule ``rule(ratio)`` for every layer with a ratio (None: the layer stays dense)."""
    rules = {}
    for i, ratio in enumerate(ratios):
        if ratio is not None:
            make_router(layers[i], router_bias)
            rules[i] = rule(ratio)
    return rules
