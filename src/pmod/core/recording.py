"""``record_routing``: which tokens each routed layer processed, and the weights its method gave them."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RoutingRecord:
    """Routing decisions recorded by :func:`record_routing`, one entry per forward, keyed by layer index.

    ``processed[l][i]`` is the bool mask [batch, seq] of tokens layer ``l`` processed in the i-th forward;
    ``weights[l][i]`` the method's per-token weights [batch, seq] (float32): p-MoD's ``w~``, MoD's ``w + 1``,
    gamma-MoD's routing probability, FastV's attention score; None where the method has none.
    """

    processed: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    weights: dict[int, list[torch.Tensor | None]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, layer_idx: int, processed: torch.Tensor, weights: torch.Tensor | None) -> None:
        self.processed[layer_idx].append(processed.detach())
        self.weights[layer_idx].append(None if weights is None else weights.detach().float())


@contextlib.contextmanager
def recording(layers: dict[int, nn.Module], on_empty: Callable[[], Exception]) -> Iterator[RoutingRecord]:
    """Attach a fresh :class:`RoutingRecord` to ``layers`` for the duration of the block."""
    if not layers:
        raise on_empty()
    record = RoutingRecord()
    for layer in layers.values():
        layer.routing_recorder = record
    try:
        yield record
    finally:
        for layer in layers.values():
            layer.routing_recorder = None
