"""Independent references of PyramidDrop and DART, in the style of :mod:`pmod.testing.reference`: rules for
:func:`pmod.testing.reference.run_layers` written again from the papers and the authors' code, with Python sorts
per row, transformers' own eager attention for the attention scores, and no ``pmod.core`` or ``pmod.methods``.

The settings come from the test that builds a reference (never from a pmod config); :data:`PAPER` holds the papers'
defaults, which ``tests/test_paper_constants.py``-style tests hold the configs' defaults to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pmod.testing.reference import Context, Decision

#: The papers' settings. PyramidDrop (CVPR 2025) 3.2 and its scripts (``--layer_list '[8,16,24]'
#: --image_token_ratio_list "[0.5,0.25,0.125]"``): boundaries 8, 16, 24 and lambda 0.5. DART: K = 2, 4 vision and
#: 4 text pivots (``--pivot_image_token 4 --pivot_text_token 4``), 128 of LLaVA-1.5's 576 tokens kept
#: (``--reduction_ratio 0.778``: keep 0.222).
PAPER = {
    "pdrop": {"layers": [8, 16, 24], "keep": 0.5},
    "dart": {"layer": 2, "keep": 0.222, "pivots": 4, "text_pivots": 4},
}


def _ranked(values: torch.Tensor, candidates: list[int], descending: bool = True) -> list[int]:
    """``candidates`` by ``values`` (largest first, or smallest with ``descending=False``), ties by position."""
    sign = -1.0 if descending else 1.0
    return sorted(candidates, key=lambda p: (sign * values[p].item(), p))


def _positions(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class PDropReference:
    """PyramidDrop: at boundary ``layers[s-1]`` the vision tokens kept so far are ranked by the eager attention
    (mean over heads) that the last real prompt token pays them in that layer, attending only to the tokens still
    kept; the top ``floor(n_vision * keep ** s)`` (the authors' ``int(n * ratio)``) stay until the next boundary.
    One object serves every routed layer of a forward (it carries the stage's kept tokens from layer to layer)."""

    def __init__(self, layers: Sequence[int], keep: float, rotary_emb: nn.Module) -> None:
        self.layers, self.keep, self.rotary_emb = list(layers), keep, rotary_emb
        self.kept: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.ranking_rows: dict[int, torch.Tensor] = {}  # boundary layer -> its attention rows [B, T]

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Decision:
        vision = ctx.vision & ctx.real
        if idx in self.layers:
            stage = self.layers.index(idx) + 1
            before = vision if stage == 1 else self.kept
            self.kept, self.rows = self._drop(layer, x, ctx, vision, before, stage)
            self.ranking_rows[idx] = self.rows
        return (ctx.real & ~vision) | self.kept, None, None, self.rows

    def _drop(self, layer: nn.Module, x: torch.Tensor, ctx: Context, vision: torch.Tensor, before: torch.Tensor,
              stage: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        bsz, seq = ctx.real.shape
        keys = ctx.real & (~vision | before)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None] & keys[:, None, :] | torch.eye(seq, dtype=torch.bool, device=x.device)[None]
        mask = torch.zeros(bsz, 1, seq, seq, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
        positions = torch.arange(seq, device=x.device)[None].expand(bsz, seq)
        cos_sin = self.rotary_emb(x, positions)
        _, probs = layer.self_attn(layer.input_layernorm(x), attention_mask=mask, position_embeddings=cos_sin)
        if probs is None:
            raise ValueError("PDropReference needs eager attention (attention probabilities)")
        kept = torch.zeros_like(vision)
        rows = []
        for b in range(bsz):
            last = max(_positions(ctx.real[b] & ~ctx.decode))
            row = probs[b, :, last, :].float().mean(0)
            rows.append(row)
            count = math.floor(len(_positions(vision[b])) * self.keep**stage)
            kept[b, _ranked(row, _positions(before[b]))[:count]] = True
        return kept, torch.stack(rows)
