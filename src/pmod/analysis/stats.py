"""Routing statistics of a training run: per routed layer the share of vision tokens processed, and the mean,
spread, saturation and non-finite share of the method's token weights (logged with the loss by ``pmod train``)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from pmod.core.backbone import backbone_for
from pmod.core.convert import routed_layers
from pmod.methods.vision_router import VisionRouterRule


class RoutingStats:
    """Accumulates routing statistics over the micro-batches of one logging step."""

    def __init__(self, model: nn.Module) -> None:
        layers = routed_layers(model)
        self.layers = sorted(layers)
        self.routable_ids = backbone_for(model).routable_token_ids(model.config)
        # Saturation is defined for bounded weights: w~ = scale * act(logit) + bias with tanh or sigmoid.
        rules = [layer.routing_rule for layer in layers.values()]
        bounded = [r for r in rules if isinstance(r, VisionRouterRule) and r.activation in ("tanh", "sigmoid")]
        self.norm = (bounded[0].activation, bounded[0].scale, bounded[0].bias) if bounded else None
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, rec: Any, inputs: dict[str, torch.Tensor]) -> None:
        """Add the routing of one forward (``rec`` from :func:`pmod.record_routing`) on ``inputs``."""
        ids = inputs.get("input_ids")
        if ids is None or not self.routable_ids:
            return
        vision = torch.isin(ids, torch.tensor(self.routable_ids, device=ids.device))
        if "attention_mask" in inputs:
            vision &= inputs["attention_mask"].bool()
        n = int(vision.sum())
        if n == 0:
            return
        for layer in self.layers:
            for processed, weights in zip(rec.processed.get(layer, []), rec.weights.get(layer, [])):
                if processed.shape != vision.shape:
                    continue
                self._acc(f"pmod/processed/L{layer}", float(processed[vision].sum()), n)
                if weights is None:
                    continue
                w = weights[vision].double()
                finite = torch.isfinite(w)
                self._acc("pmod/nonfinite_weights", float((~finite).sum()), n)
                w = w[finite]
                self._acc("pmod/w_mean", float(w.sum()), int(w.numel()))
                self._acc("pmod/w_sq", float((w * w).sum()), int(w.numel()))
                sat = self._saturated(w)
                if sat is not None:
                    self._acc("pmod/w_saturated", float(sat.sum()), int(w.numel()))

    def _saturated(self, w: torch.Tensor) -> torch.Tensor | None:
        # "Within 1% of the bounds": the activation's output is in its outer 1% (|tanh| >= 0.99, sigmoid <= 0.01
        # or >= 0.99); a router stuck there no longer gets useful gradients.
        if self.norm is None:
            return None
        norm, scale, bias = self.norm
        u = (w - bias) / scale
        if norm == "tanh":
            return u.abs() >= 0.99
        return (u <= 0.01) | (u >= 0.99)

    def _acc(self, key: str, total: float, n: int) -> None:
        self.sums[key] += total
        self.counts[key] += n

    def summary(self) -> dict[str, float]:
        """Mean statistics since the last :meth:`reset`: processed vision-token fraction per layer, mean/std of the
        weights over vision tokens, the fraction saturated at the activation's bounds, the non-finite share."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if k.startswith("pmod/processed")}
        if self.counts.get("pmod/w_mean"):
            mean = self.sums["pmod/w_mean"] / self.counts["pmod/w_mean"]
            sq = self.sums["pmod/w_sq"] / self.counts["pmod/w_sq"]
            out["pmod/w_mean"] = mean
            out["pmod/w_std"] = math.sqrt(max(sq - mean * mean, 0.0))
        for key in ("pmod/w_saturated", "pmod/nonfinite_weights"):
            if self.counts.get(key):
                out[key] = self.sums[key] / self.counts[key]
        return out
