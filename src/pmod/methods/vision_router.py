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

from pmod.core.plan import VISION
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "none": lambda logits: logits,
}


class Router(nn.Linear):
    """``Linear(hidden, 1)`` returning ``[B, T, 1]`` logits in one batched matmul (a plain ``Linear`` on a 3-D input
    dispatches four ops). Same parameters and state-dict keys as ``nn.Linear``; called as a module, so ZeRO-3/FSDP
    hooks gather its weight as for any other layer."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.dim() != 3:
            return super().forward(hidden)
        weight = self.weight.t().expand(hidden.shape[0], -1, -1)
        return torch.bmm(hidden, weight) if self.bias is None else torch.baddbmm(self.bias, hidden, weight)


def make_router(layer: nn.Module, bias: bool) -> Router:
    """A zero-initialised ``Linear(hidden, 1)`` router on the layer's device and dtype, registered as
    ``layer.router``.

    Zero weights give every token the same logit 0, so ``w~`` is ``scale * act(0) + bias`` for all of them.
    """
    weight = layer.input_layernorm.weight
    router = Router(weight.shape[-1], 1, bias=bias, device=weight.device, dtype=weight.dtype)
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
        # Text-only inference (every decode step): nothing to route, so skip the router and the selection.
        # Training keeps the router in the graph so that data-parallel wrappers see it used in every step.
        if inputs.vision_mask is None and layer.routing_recorder is None and not torch.is_grad_enabled():
            return None
        logits = layer.router(hidden).float()  # [B, T, 1]
        plan = inputs.plan
        vision = plan.shared("vision", lambda: plan.candidates(VISION, lambda: inputs.vision_mask, hidden).float())
        # One factor per token: w~ on vision tokens (kept: on the MLP branch; skipped, with STRing: on x), 1 on text.
        # 1 + vision * (scale * act + bias - 1) is one fused op on top of what the forward's layers share.
        offset = plan.shared(("vision offset", self.bias), lambda: vision * (self.bias - 1.0) + 1.0)
        token_scale = torch.addcmul(offset, vision, ACTIVATIONS[self.activation](logits), value=self.scale)
        return RouteDecision(
            scores=logits,
            candidates=VISION,
            candidate_mask=lambda: inputs.vision_mask,
            token_scale=token_scale.to(hidden.dtype),
            scale_skipped=self.string,
            # Recorded only (detached: a recorder active in the forward but not in a checkpoint's replay must not
            # change what autograd saves).
            weights=None if layer.routing_recorder is None else self.token_weights(logits[..., 0].detach()),
        )


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
