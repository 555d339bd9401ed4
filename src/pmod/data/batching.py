"""Batching of :class:`pmod.data.dataset.LlavaDataset` items: the padding collator and the modality-grouped,
length-grouped batch sampler of the LLaVA recipe."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Sampler

from pmod.data.dataset import IGNORE_INDEX, TOKEN_KEYS


@dataclass
class LlavaCollator:
    """Pads a list of :class:`LlavaDataset` items into a batch.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` with 0, on the right
    (training) or left (generation). Image entries of all items are concatenated in item order (the model fills
    image tokens in that order); LLaVA-NeXT ``pixel_values`` with different patch counts are zero-padded to the
    largest (``image_sizes`` tells the model the real count). Text-only batches have no ``pixel_values``.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, **kwargs: Any) -> LlavaCollator:
        """A collator padding with the tokenizer's pad token (else its unk, else its eos token)."""
        for name in ("pad_token_id", "unk_token_id", "eos_token_id"):
            pad = getattr(tokenizer, name, None)
            if pad is not None:
                return cls(int(pad), **kwargs)
        raise ValueError("the tokenizer has no pad, unk or eos token to pad with; pass pad_token_id")

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            key: torch.stack([self._pad(it[key], length, value) for it in items])
            for key, value in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX), ("attention_mask", 0))
        }
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
        if pixels:
            if pixels[0].dim() == 5:  # (images, patches, C, H, W): pad the patch dimension
                most = max(p.shape[1] for p in pixels)
                pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
            batch["pixel_values"] = torch.cat(pixels)
        # In item order; OneVision's batch_num_images counts each prompt's images (several: base views only).
        for key in ("image_sizes", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "batch_num_images"):
            parts = [it[key] for it in items if key in it]
            if parts:
                batch[key] = torch.cat(parts)
        for key in TOKEN_KEYS:  # per-token marks (Qwen-VL's mm_token_type_ids), padded like the mask
            if any(key in it for it in items):
                batch[key] = torch.stack([self._pad(it.get(key, torch.zeros_like(it["input_ids"])), length, 0)
                                          for it in items])  # fmt: skip
        return batch

    def _pad(self, t: torch.Tensor, length: int, value: int) -> torch.Tensor:
        pad = t.new_full((length - len(t),), value)
        return torch.cat([t, pad] if self.padding_side == "right" else [pad, t])


class ModalityLengthGroupedSampler(Sampler[list[int]]):
    """A batch sampler that never mixes image and text-only samples in a batch, like LLaVA's
    ``group_by_modality_length``, deterministic in ``(seed, epoch)`` so a resumed run sees the same order.

    Each epoch, each modality's indices are shuffled and cut into mega-batches of ``batch_size * world_size``; the
    full mega-batches of both modalities are shuffled together, and the partial last one of each modality comes at
    the end (left out with ``drop_last``). A mega-batch is sorted by length and split across ranks into batches of
    similar total length; this rank's batch is yielded. With ``world_size=1`` every index comes exactly once per
    epoch; with more ranks a mega-batch smaller than ``world_size`` repeats indices so every rank gets a batch.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)`` and call :meth:`set_epoch` each epoch.

    Args:
        modality_lengths: per sample, a length > 0 for samples with images and < 0 for text-only ones
            (:attr:`LlavaDataset.modality_lengths`).
    """

    def __init__(
        self,
        modality_lengths: Sequence[int],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if any(n == 0 for n in modality_lengths):
            raise ValueError("modality lengths must be non-zero (positive: with image, negative: text-only)")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, world_size={world_size}, rank={rank}")
        self.lengths = list(modality_lengths)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.drop_last, self.epoch = seed, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def megabatches(self) -> list[list[int]]:
        """This epoch's mega-batches (all ranks), each sorted by decreasing length."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        size = self.batch_size * self.world_size
        full, partial = [], []
        for image in (True, False):
            idx = [i for i, n in enumerate(self.lengths) if (n > 0) == image]
            idx = [idx[k] for k in torch.randperm(len(idx), generator=g).tolist()]
            for k in range(0, len(idx), size):
                (full if len(idx[k : k + size]) == size else partial).append(idx[k : k + size])
        order = torch.randperm(len(full), generator=g).tolist()
        chosen = [full[k] for k in order] + ([] if self.drop_last else partial)
        return [sorted(mb, key=lambda i: -abs(self.lengths[i])) for mb in chosen]

    def _split(self, megabatch: list[int]) -> list[list[int]]:
        # LLaVA's split_to_even_chunks: longest first into the rank with the least total length so far.
        if len(megabatch) < self.world_size:
            megabatch = (megabatch * self.world_size)[: self.world_size]
        cap = math.ceil(len(megabatch) / self.world_size)
        chunks: list[list[int]] = [[] for _ in range(self.world_size)]
        totals = [0] * self.world_size
        for i in megabatch:
            k = min((k for k in range(self.world_size) if len(chunks[k]) < cap), key=lambda k: totals[k])
            chunks[k].append(i)
            totals[k] += abs(self.lengths[i])
        return chunks

    def __iter__(self) -> Iterator[list[int]]:
        for mb in self.megabatches():
            yield mb if self.world_size == 1 else self._split(mb)[self.rank]

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        n_image = sum(1 for n in self.lengths if n > 0)
        counts = (n_image, len(self.lengths) - n_image)
        return sum(c // size if self.drop_last else math.ceil(c / size) for c in counts)
