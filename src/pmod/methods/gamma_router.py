"""gamma-MoD's routing at run time: the shared router, masked routing, the decode rule and the routing loss
(the settings are :class:`pmod.methods.gamma_mod.GammaMoDConfig`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pmod.core.compaction import kept_counts, top_k_mask
from pmod.core.routed_layer import RouteDecision, RoutingInputs, RoutingRule
from pmod.methods.gamma_mod import ROUTER_NAME, GammaMoDConfig

#: The plan's candidate kind of gamma-MoD: every real token that is not a question token.
ROUTABLE = "gamma_mod_routable"


def make_shared_router(decoder: nn.Module, layers: nn.ModuleList, bias: bool) -> nn.Linear:
    """The ``Linear(hidden, 2)`` every MoD layer shares, registered once on the decoder (next to its layers)."""
    weight = layers[0].input_layernorm.weight
    router = nn.Linear(weight.shape[-1], 2, bias=bias, device=weight.device, dtype=weight.dtype)
    setattr(decoder, ROUTER_NAME, router)  # the layers' rules hold a reference, not a second registration
    return router


def question_tokens(inputs: RoutingInputs, real: torch.Tensor, seq: int) -> torch.Tensor:
    """The always-processed tokens: ``question_mask``, or without one every prompt text token of a multi-token
    chunk (text without a label when labels are given)."""
    if inputs.question_mask is not None:
        return inputs.question_mask & real
    if seq == 1:
        return torch.zeros_like(real)
    text = real if inputs.vision_mask is None else real & ~inputs.vision_mask
    if inputs.labels is not None:
        text = text & (inputs.labels == -100)
    return text


class GammaMoDRule(RoutingRule):
    """One gamma-MoD layer: the shared router's probability decides, per chunk kind, which routable tokens run."""

    def __init__(self, router: nn.Linear, ratio: float, config: GammaMoDConfig) -> None:
        self.router, self.ratio, self.config = router, float(ratio), config

    def route(
        self, layer: nn.Module, hidden: torch.Tensor, inputs: RoutingInputs, position_embeddings: object = None
    ) -> RouteDecision:
        cfg = self.config
        seq = hidden.shape[1]
        real = inputs.real_mask(hidden)
        logits = self.router(layer.input_layernorm(hidden)).float()
        p = logits.softmax(dim=-1)[..., 1]
        routable = real & ~question_tokens(inputs, real, seq)
        training = torch.is_grad_enabled() and layer.training
        token_scale = torch.where(routable, p, 1.0)[..., None].to(hidden.dtype)
        if seq > 1 and cfg.prefill_rule == "top_k" and not training:
            # Sizes known from the counts: the plan selects, with no host sync in this layer.
            return RouteDecision(scores=p[..., None], candidates=ROUTABLE, candidate_mask=lambda: routable,
                                 token_scale=token_scale, weights=p,
                                 renumber_positions=cfg.renumber_positions)  # fmt: skip
        # The decode and threshold rules keep a number of tokens that depends on the data (one host sync to size
        # the layer); training needs the kept mask for the routing loss.
        if seq == 1:
            kept = routable & (p >= cfg.decode_threshold)
        elif cfg.prefill_rule == "threshold" and not training:
            kept = routable & (p > cfg.prefill_threshold)
        else:
            kept = top_k_mask(p, routable, kept_counts(routable.sum(dim=1), self.ratio))
        if training:
            # Computed in every training forward (also when gradient checkpointing replays the layer, so the replay
            # saves the same tensors); collected only once, by the model's hook.
            loss = routing_loss(logits, kept, routable) * cfg.routing_loss_weight
            if inputs.routing_losses is not None:
                inputs.routing_losses.append(loss)
        return RouteDecision(processed=~routable | kept, token_scale=token_scale, weights=p,
                             renumber_positions=cfg.renumber_positions)  # fmt: skip


def routing_loss(logits: torch.Tensor, kept: torch.Tensor, routable: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the router logits [B, T, 2] against the top-k labels (1 = kept) over the routable
    tokens; 0 for a chunk without routable tokens (still connected to the router, so data-parallel wrappers see it
    used)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), kept.flatten().long(), reduction="none").view(kept.shape)
    return (per_token * routable).sum() / routable.sum().clamp(min=1)
