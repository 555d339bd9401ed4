"""Independent references of PyramidDrop and DART, in the style of :mod:`pmod.testing.reference`: rules for
:func:`pmod.testing.reference.run_layers` written again from the papers and the authors' code, with Python sorts
per row, transformers' own eager attention for the attention scores, and no ``pmod.core`` or ``pmod.methods``.

The settings come from the test that builds a reference (never from a pmod config); :data:`PAPER` holds the papers'
defaults, which ``tests/test_paper_constants.py``-style tests hold the configs' defaults to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pmod.testing.reference import Context, Decision, paper_settings

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

    def __init__(self, layers: Sequence[int], keep: float) -> None:
        self.layers, self.keep = list(layers), keep
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
        _, probs = layer.self_attn(layer.input_layernorm(x), attention_mask=mask, position_embeddings=ctx.cos_sin)
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


class DARTReference:
    """DART: serves layer K-1 (dense; it notes its input for the keys) and the layers >= K. At layer K per row: the
    ``pivots`` vision tokens and the ``text_pivots`` text tokens after the last vision token with the largest L1
    norm of their layer K-1 keys (after RoPE); then, pivots in position order, each takes the
    ``ceil((budget - vision pivots) / pivots)`` free vision tokens least cosine-similar to it on ``norm(x)``; the
    vision pivots and these picks, in that order, cut at ``round(n_vision * keep)``, are kept."""

    def __init__(self, layer: int, keep: float, pivots: int, text_pivots: int, norm: nn.Module) -> None:
        self.layer, self.keep, self.counts, self.norm = layer, keep, (pivots, text_pivots), norm
        self.key_norms: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Decision:
        vision = ctx.vision & ctx.real
        if idx == self.layer - 1:
            self.key_norms = self._key_norms(layer, x, ctx.cos_sin)
            return ctx.real, None, None, None
        if idx == self.layer:
            states = self.norm(x).float()
            self.kept = torch.zeros_like(vision)
            prompt = ctx.real & ~ctx.decode
            for b in range(x.shape[0]):
                self.kept[b, self._row(states[b], self.key_norms[b], vision[b], prompt[b])] = True
        return (ctx.real & ~vision) | self.kept, None, None, None

    def _key_norms(self, layer: nn.Module, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The keys' L1 norms [B, T] as the layer's attention makes its keys: k_proj of the normed input, the
        per-head norm where the model has one (Qwen3's k_norm), RoPE ([B or 1, T, d] tables)."""
        attn = layer.self_attn
        bsz, seq = x.shape[:2]
        cos, sin = cos_sin
        k = attn.k_proj(layer.input_layernorm(x)).view(bsz, seq, -1, attn.head_dim)
        if getattr(attn, "k_norm", None) is not None:
            k = attn.k_norm(k)
        if cos.dim() == 4:  # M-RoPE per axis ([3, B, T, d], transformers <= ~5.15): the i-th section takes axis i % 3
            rope = getattr(attn.config, "rope_parameters", None) or attn.config.rope_scaling
            sections = list(rope["mrope_section"]) * 2
            cos, sin = (torch.cat([c[i % 3] for i, c in enumerate(t.split(sections, dim=-1))], dim=-1)
                        for t in (cos, sin))
        k = k * cos[:, :, None, :] + _rotate_half(k) * sin[:, :, None, :]
        return k.float().abs().sum(dim=(2, 3))

    def _row(self, states: torch.Tensor, norms: torch.Tensor, vision: torch.Tensor, real: torch.Tensor) -> list[int]:
        image = _positions(vision)
        if not image:
            return []
        after = [p for p in _positions(real & ~vision) if p > max(image)]
        image_pivots = _ranked(norms, image)[: self.counts[0]]
        pivots = sorted(image_pivots + _ranked(norms, after)[: self.counts[1]])
        budget = round(len(image) * self.keep)
        per_pivot = max(0, math.ceil((budget - len(image_pivots)) / len(pivots)))
        chosen = list(image_pivots)
        for pivot in pivots:
            free = [p for p in image if p not in chosen]
            similarity = torch.stack([nn.functional.cosine_similarity(states[pivot], states[p], dim=0) for p in free]) \
                if free else torch.zeros(0)  # fmt: skip
            chosen += [free[i] for i in _ranked(similarity, list(range(len(free))), descending=False)[:per_pivot]]
        return chosen[:budget]


#: The settings each paper fixes (a model holding another value is refused unless the test declares it); the others
#: are the test's choices: PyramidDrop's boundaries (scaled to the model's depth), DART's budget.
FIXED = {"pdrop": ("keep",), "dart": ("layer", "pivots", "text_pivots")}


def pruning_rules(model: nn.Module, cfg: Any, declared: Mapping[str, Any]) -> dict[int, Any]:
    """The reference rules of a PyramidDrop or DART model (what :func:`pmod.testing.reference.reference_rules`
    returns for them): the paper's fixed settings (:data:`FIXED`; ``declared`` replaces them) and the test's
    choices read from ``cfg``; the model's routed layers must be the ones the reference derives."""
    from pmod.core.backbone import backbone_for
    from pmod.core.convert import routed_layers

    settings = paper_settings(cfg, declared, {name: PAPER[cfg.method][name] for name in FIXED[cfg.method]})
    decoder = backbone_for(model).decoder(model)
    num_layers = len(decoder.layers)
    if cfg.method == "pdrop":
        rule: Any = PDropReference(cfg.layers, settings["keep"])
        want = set(range(cfg.layers[0], num_layers))
    else:
        k = settings["layer"]
        rule = DARTReference(k, cfg.keep, settings["pivots"], settings["text_pivots"], decoder.norm)
        want = set(range(k - 1, num_layers))
    if set(routed_layers(model)) != want:
        raise ValueError(f"reference: the model routes layers {sorted(routed_layers(model))}, the reference "
                         f"{sorted(want)}")  # fmt: skip
    return dict.fromkeys(sorted(want), rule)
