"""The routing plan of one forward: what sizes every routed layer's work, worked out once.

Per routed layer, the number of tokens each row processes follows from numbers known when the forward starts: the
row's real tokens, its candidate (routable) tokens, and the layer's ratio. :class:`ForwardPlan` reads the per-row
counts to the host once per forward and candidate kind (one host sync), derives every layer's compacted size from
them on the host, and builds the device tensors the layers share (slot validity and filler offsets for every ratio,
the ranking fill, RoPE tables expanded to the batch). A routed layer then selects its tokens with no host sync:

    ranked = scores on candidates, +inf on the other real tokens, -inf on padding       [B, T, 1]
    top    = the K best by a stable sort (ties: lower position first)                   [B, K, 1]
    index  = top in position order, filler slots (rows with fewer than K) after the real ones

Fillers at the end of each compacted row matter: under a causal mask no real slot ever attends to one, so the
layer's attention needs no mask of its own in a prefill, and the KV cache marks them invalid for later steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pmod.core.compaction import compact_index
from pmod.core.schedules import kept_count

#: The candidate kind every vision-token method ranks: the real vision tokens of the forward.
VISION = "vision"


@dataclass
class Selection:
    """The tokens a routed layer runs.

    Attributes:
        index: long [B, K, 1], positions of the processed tokens in original order, filler slots after them.
        valid: bool [B, K, 1], False on filler slots; None when every slot is real.
        slots: K, the compacted length.
        total: processed real tokens over all rows (the length of the packed sequence).
    """

    index: torch.Tensor
    valid: torch.Tensor | None
    slots: int
    total: int


@dataclass
class _Group:
    """One candidate kind of a forward: its mask and per-ratio sizes (host) and slot tensors (device)."""

    mask: torch.Tensor  # bool [B, T, 1]
    rows: list[list[int]]  # per row: [candidates..], [real tokens..] (read to the host once)
    counts: dict[tuple[float, str], list[int]]  # processed tokens per row, per (ratio, rounding)
    valid: dict[tuple[float, str], torch.Tensor] = field(default_factory=dict)  # [B, Kmax, 1] per ratio
    offsets: dict[tuple[float, str], torch.Tensor] = field(default_factory=dict)  # 0 real slot, T filler


class ForwardPlan:
    """Shared, per-forward state of the routed layers (made by the model's forward pre-hook).

    ``ratios`` are the (ratio, rounding) pairs of the model's routed layers, so that the slot tensors of all of
    them are built together; a ratio not listed still works, at a few more ops.
    """

    def __init__(
        self,
        token_mask: torch.Tensor | None,
        ratios: tuple[tuple[float, str], ...] = (),
        counts: dict[str, list[int]] | None = None,
    ) -> None:
        self.token_mask = token_mask
        self.ratios = ratios
        self.counts = counts or {}  # per candidate kind (and "real"), per row, when the caller knows them
        self._groups: dict[str, _Group] = {}
        self._memo: dict[Any, Any] = {}

    def select(
        self,
        kind: str,
        candidates: Callable[[], torch.Tensor | None],
        scores: torch.Tensor,
        ratio: float,
        rounding: str = "floor",
    ) -> Selection | None:
        """Per row every real non-candidate token and the ``kept_count(n, ratio, rounding)`` candidates with the
        highest ``scores`` [B, T, 1]; None when that is every token of every row. ``candidates()`` gives the bool
        [B, T] candidate mask of ``kind`` (asked once per forward). Equal ``scores`` objects give the same
        selection without a second sort (FastV's layers share one ranking)."""
        key = (kind, id(scores), ratio, rounding)
        if key not in self._memo:
            self._memo[key] = (scores, self._select(self._group(kind, candidates, scores), scores, ratio, rounding))
        return self._memo[key][1]

    def candidates(self, kind: str, make: Callable[[], torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """The real candidate tokens of ``kind``, bool [B, T, 1] (``make()`` gives the mask, None: none)."""
        return self._group(kind, make, like).mask

    def select_mask(self, processed: torch.Tensor) -> Selection | None:
        """The selection of a processed mask [B, T] (real tokens only) whose counts depend on the data (gamma-MoD's
        thresholds): one host sync to size it. None when it is every token."""
        counts = processed.sum(1)
        most, least, total = (int(v) for v in torch.stack([counts.max(), counts.min(), counts.sum()]).tolist())
        if least == processed.shape[1]:
            return None
        index, valid = compact_index(processed, most)
        return Selection(index.unsqueeze(-1), None if least == most else valid.unsqueeze(-1), most, total)

    def rank_fill(self, like: torch.Tensor) -> torch.Tensor:
        """[B, T, 1] float: +inf on real tokens, -inf on padding (what non-candidates rank with)."""
        if "fill" not in self._memo:
            if self.token_mask is None:
                fill = torch.full((1, 1, 1), float("inf"), device=like.device)
            else:
                fill = torch.where(self.token_mask[..., None], float("inf"), float("-inf"))
            self._memo["fill"] = fill
        return self._memo["fill"]

    def token_valid(self) -> torch.Tensor | None:
        """The chunk's real tokens as a key-validity row, bool [B, 1, 1, T]; None when every token is real."""
        if self.token_mask is None:
            return None
        if "token_valid" not in self._memo:
            self._memo["token_valid"] = self.token_mask.view(self.token_mask.shape[0], 1, 1, -1)
        return self._memo["token_valid"]

    def shared(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()`` once per forward under ``key`` (RoPE tables expanded to the batch, masks of one size...)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def _group(self, kind: str, candidates: Callable[[], torch.Tensor | None], like: torch.Tensor) -> _Group:
        if kind in self._groups:
            return self._groups[kind]
        bsz, seq = like.shape[:2]
        real = self.token_mask
        mask = candidates()
        if mask is None:
            mask = torch.zeros(bsz, seq, dtype=torch.bool, device=like.device)
        elif real is not None:
            mask = mask & real
        rows = self._rows(kind, mask, real, seq)
        group = _Group(mask[..., None], rows, {})
        for ratio, rounding in self.ratios:
            group.counts[(ratio, rounding)] = _counts(rows, ratio, rounding)
        self._groups[kind] = group
        self._slot_tensors(group, list(group.counts), seq, like.device)
        return group

    def _rows(self, kind: str, mask: torch.Tensor, real: torch.Tensor | None, seq: int) -> list[list[int]]:
        """Per row the candidate and the real token counts: the caller's, or read to the host (the forward's one
        host sync)."""
        if kind in self.counts and (real is None or "real" in self.counts):
            return [list(self.counts[kind]), list(self.counts.get("real", [seq] * len(self.counts[kind])))]
        n = mask.sum(1)
        return torch.stack([n, real.sum(1) if real is not None else torch.full_like(n, seq)]).tolist()

    def _slot_tensors(self, group: _Group, keys: list[tuple[float, str]], seq: int, device: torch.device) -> None:
        """Slot validity and filler offsets [B, Kmax, 1] of every ratio in ``keys``, built together."""
        if not keys:
            return
        counts = [group.counts[k] for k in keys]
        widest = max(max(row) for row in counts)
        host = torch.tensor(counts, dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()  # copied without making the host wait for the device
        counts_dev = host.to(device, non_blocking=True)
        valid = torch.arange(widest, device=device)[None, None, :, None] < counts_dev[:, :, None, None]
        offsets = torch.where(valid, 0, seq)
        group.valid.update(zip(keys, valid.unbind(0), strict=True))
        group.offsets.update(zip(keys, offsets.unbind(0), strict=True))

    def _select(self, group: _Group, scores: torch.Tensor, ratio: float, rounding: str) -> Selection | None:
        key = (ratio, rounding)
        if key not in group.counts:  # a ratio the hook did not list (a layer called on its own)
            group.counts[key] = _counts(group.rows, ratio, rounding)
            self._slot_tensors(group, [key], scores.shape[1], scores.device)
        counts = group.counts[key]
        slots, seq = max(counts), scores.shape[1]
        if min(counts) == seq:
            return None
        ranked = torch.where(group.mask, scores, self.rank_fill(scores))
        top = ranked.sort(dim=1, descending=True, stable=True).indices[:, :slots]
        if min(counts) == slots:  # no filler slot: only the order to restore
            return Selection(top.sort(dim=1).values, None, slots, sum(counts))
        # Fillers get position + T, so sorting puts them after every real slot; the remainder takes T off again.
        index = (top + group.offsets[key][:, :slots]).sort(dim=1).values.remainder(seq)
        return Selection(index, group.valid[key][:, :slots], slots, sum(counts))


def _counts(rows: list[list[int]], ratio: float, rounding: str) -> list[int]:
    """Processed tokens per row: the real non-candidates, and the kept share of the candidates."""
    return [real - n + kept_count(n, ratio, rounding) for n, real in zip(rows[0], rows[1], strict=True)]
