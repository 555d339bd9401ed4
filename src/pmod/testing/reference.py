"""Independent references of the routing methods: a plain full-length forward of the *unconverted* model in which
every layer runs over all T tokens with explicit masks, and each method's rule is written out again here (Python
sorts per row, eager attention probabilities) without ``pmod.core`` or ``pmod.methods``.

In a routed layer the attention mask removes unprocessed tokens as keys (their own query rows are discarded), then
the output rules are applied token by token: processed ``h + s * m`` (``s`` the method's MLP scale), skipped
``w * x`` (p-MoD's STRing) or ``x``. Tests and ``benchmarks/gpu_check.py`` compare the compacted execution with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Context:
    """What the reference rules see of the whole sequence.

    ``prompt_length``: positions from here on are tokens decoded one at a time in a cached run (teacher-forced
    here); None: the whole sequence is one forward.
    """

    real: torch.Tensor
    vision: torch.Tensor
    question: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    prompt_length: int | None = None
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> probs [B, H, T, T]

    @property
    def decode(self) -> torch.Tensor:
        """Bool [T]: positions decoded one at a time."""
        seq = self.real.shape[1]
        start = seq if self.prompt_length is None else self.prompt_length
        return torch.arange(seq, device=self.real.device) >= start


Decision = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _top(scores: torch.Tensor, candidates: list[int], k: int) -> list[int]:
    return sorted(candidates, key=lambda p: (-scores[p].item(), p))[:k]


class VisionRouterReference:
    """p-MoD and MoD: per-layer ``Linear(hidden, 1)`` logit, top ``floor(ratio * n_vision)`` vision tokens,
    ``w = scale * act(logit) + bias``; kept ``h + w m``, skipped ``w x`` with STRing, else ``x``."""

    def __init__(self, router: nn.Module, ratio: float, act: str, scale: float, bias: float, string: bool) -> None:
        self.router, self.ratio, self.act, self.scale, self.bias, self.string = router, ratio, act, scale, bias, string

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Decision:
        logits = self.router(x).squeeze(-1).float()
        act = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda t: t}[self.act](logits)
        w = self.scale * act + self.bias
        vision = ctx.vision & ctx.real
        kept = torch.zeros_like(vision)
        for b in range(x.shape[0]):
            candidates = vision[b].nonzero().flatten().tolist()
            kept[b, _top(logits[b], candidates, math.floor(len(candidates) * self.ratio))] = True
        processed = (ctx.real & ~vision) | kept
        skip = torch.where(vision & ~kept, w, 1.0) if self.string else None
        return processed, torch.where(kept, w, 1.0), skip, w


class GammaMoDReference:
    """gamma-MoD: shared ``Linear(hidden, 2)`` on the normalised input, ``p = softmax[..., 1]``; routable = real and
    not question; prompt positions keep the top ``floor(n_routable * ratio)`` by ``p``, decoded positions keep
    ``p >= threshold``; kept ``h + p m``, skipped ``x``."""

    def __init__(self, router: nn.Module, ratio: float, decode_threshold: float = 0.5) -> None:
        self.router, self.ratio, self.threshold = router, ratio, decode_threshold

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Decision:
        p = self.router(layer.input_layernorm(x)).float().softmax(-1)[..., 1]
        decode = ctx.decode[None, :].expand_as(ctx.real)
        if ctx.question is not None:
            question = ctx.question & ctx.real
        else:  # every prompt text token (without a label, when labels are given)
            question = ctx.real & ~ctx.vision & ~decode
            if ctx.labels is not None:
                question &= ctx.labels == -100
        routable = ctx.real & ~question
        kept = torch.zeros_like(routable)
        for b in range(x.shape[0]):
            prompt = (routable[b] & ~decode[b]).nonzero().flatten().tolist()
            kept[b, _top(p[b], prompt, math.floor(len(prompt) * self.ratio))] = True
            for pos in (routable[b] & decode[b]).nonzero().flatten().tolist():
                kept[b, pos] = bool(p[b, pos] >= self.threshold)
        processed = (ctx.real & ~routable) | kept
        return processed, torch.where(kept, p, 1.0), None, p


class FastVReference:
    """FastV: layers >= K keep the top ``round(n_vision * keep)`` vision tokens by the softmax attention (eager,
    mean over heads) that the last real prompt token pays them in layer K-1."""

    def __init__(self, first_layer: int, keep: float) -> None:
        self.first_layer, self.keep = first_layer, keep

    def decide(self, layer: nn.Module, idx: int, x: torch.Tensor, ctx: Context) -> Decision:
        probs = ctx.attention[self.first_layer - 1]
        vision = ctx.vision & ctx.real
        kept = torch.zeros_like(vision)
        rows = []
        for b in range(x.shape[0]):
            prompt = ctx.real[b] & ~ctx.decode
            last = int(prompt.nonzero().max())
            row = probs[b, :, last, :].float().mean(0)
            rows.append(row)
            candidates = vision[b].nonzero().flatten().tolist()
            kept[b, _top(row, candidates, round(len(candidates) * self.keep))] = True
        return (ctx.real & ~vision) | kept, None, None, torch.stack(rows)


def run_layers(
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    ctx: Context,
    rules: Mapping[int, Any],
    processed: Mapping[int, torch.Tensor] | None = None,
    between: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The decoder layers over the full sequence ``x`` [B, T, D] with explicit masks, each layer in ``rules`` applying
    its reference rule; ``between[i]`` is added after layer i (what the model adds there, e.g. Qwen3-VL's deepstack).
    """
    bsz, seq = x.shape[:2]
    device = x.device
    causal = torch.ones(seq, seq, device=device).tril().bool()
    eye = torch.eye(seq, dtype=torch.bool, device=device)
    for idx, layer in enumerate(layers):
        rule = rules.get(idx)
        keep, mlp_scale, skip_scale = ctx.real, None, None
        if rule is not None:
            keep, mlp_scale, skip_scale, _ = rule.decide(layer, idx, x, ctx)
            if processed is not None and idx in processed:
                keep = processed[idx].to(device).bool() & ctx.real
        allowed = (causal[None] & keep[:, None, :] | eye[None])[:, None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)  # additive: works for eager and sdpa
        attn_out, probs = layer.self_attn(layer.input_layernorm(x), attention_mask=mask, position_embeddings=cos_sin)
        if probs is not None:
            ctx.attention[idx] = probs
        h = x + attn_out
        m = layer.mlp(layer.post_attention_layernorm(h))
        if rule is None:
            x = h + m
        else:
            y = h + (m if mlp_scale is None else mlp_scale.to(x.dtype)[..., None] * m)
            base = x if skip_scale is None else skip_scale.to(x.dtype)[..., None] * x
            x = torch.where(keep[..., None], y, base)
        if between is not None and between[idx] is not None:
            x = x + between[idx]
    return x


def reference_logits(
    dense_model: nn.Module,
    rules: Mapping[int, Any],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    question_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    prompt_length: int | None = None,
    processed: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab] of the unconverted Llama-family ``dense_model`` (``LlamaForCausalLM``; eager attention
    for FastV, whose rule reads attention probabilities) with each layer in ``rules`` applying its reference rule.

    ``processed`` (layer -> bool [B, T]) imposes the processed tokens instead of the rule's choice (its scales are
    kept), e.g. the decisions a bf16 run recorded, so that arithmetic can be compared where near-ties could flip.
    """
    lm = dense_model.model
    bsz, seq = input_ids.shape
    ctx = Context(attention_mask.bool(), vision_mask.bool(), question_mask, labels, prompt_length)
    x = lm.embed_tokens(input_ids)
    cos_sin = lm.rotary_emb(x, torch.arange(seq, device=input_ids.device)[None].expand(bsz, seq))
    return dense_model.lm_head(lm.norm(run_layers(lm.layers, x, cos_sin, ctx, rules, processed)))


@dataclass
class DecoderInputs:
    """What a dense multimodal model hands its decoder layers for one input: the merged embeddings, the RoPE cos/sin
    (M-RoPE included) and what it adds between layers (Qwen3-VL's deepstack; None elsewhere)."""

    hidden: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    between: list[torch.Tensor | None]


def capture_decoder_inputs(dense_model: nn.Module, decoder: nn.Module, **inputs: Any) -> DecoderInputs:
    """Run ``dense_model`` once on ``inputs`` and record what its ``decoder``'s layers receive."""
    layers = decoder.layers
    seen_in: dict[int, torch.Tensor] = {}
    seen_out: dict[int, torch.Tensor] = {}
    first: dict[str, Any] = {}

    def before(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            seen_in[i] = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                first["cos_sin"] = kwargs["position_embeddings"]

        return hook

    def after(i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
            seen_out[i] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_pre_hook(before(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            dense_model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    between: list[torch.Tensor | None] = []
    for i in range(len(layers)):
        delta = seen_in[i + 1] - seen_out[i] if i + 1 < len(layers) else None
        between.append(None if delta is None or not bool(delta.any()) else delta)
    return DecoderInputs(seen_in[0], first["cos_sin"], between)


def reference_decoder_logits(
    dense_model: nn.Module,
    decoder: nn.Module,
    rules: Mapping[int, Any],
    captured: DecoderInputs,
    attention_mask: torch.Tensor,
    vision_mask: torch.Tensor,
) -> torch.Tensor:
    """Logits of a multimodal ``dense_model`` whose ``decoder`` layers apply the reference ``rules``, from the layer
    inputs the dense model itself computed (:func:`capture_decoder_inputs`): embeddings, M-RoPE and deepstack come
    from transformers, the routing from here."""
    ctx = Context(attention_mask.bool(), vision_mask.bool())
    x = run_layers(decoder.layers, captured.hidden, captured.cos_sin, ctx, rules, between=captured.between)
    return dense_model.lm_head(decoder.norm(x))


def reference_forward(
    dense_model: nn.Module,
    routers: Mapping[int, nn.Module],
    ratios: Sequence[float | None],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    cfg: Any,
    processed: Mapping[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`reference_logits` of p-MoD / MoD: ``routers`` per routed layer, ``ratios`` per layer, ``cfg`` the
    method's settings (``weight_norm``, ``scale``, ``bias``, ``string``; MoD: raw logit + 1, no STRing)."""
    act = getattr(cfg, "weight_norm", "none")
    scale, bias, string = getattr(cfg, "scale", 1.0), getattr(cfg, "bias", 1.0), getattr(cfg, "string", False)
    rules = {
        i: VisionRouterReference(routers[i], r, act, scale, bias, string) for i, r in enumerate(ratios) if r is not None
    }
    return reference_logits(dense_model, rules, input_ids, attention_mask, vision_mask, processed=processed)


def reference_rules(model: nn.Module) -> dict[int, Any]:
    """The reference rule of every routed layer of a converted model, wired to the model's own routers and
    settings (the rules themselves are the ones above, not the model's)."""
    from pmod.core.backbone import backbone_for
    from pmod.core.convert import get_method_config, routed_layers
    from pmod.methods.gamma_mod import ROUTER_NAME

    cfg = get_method_config(model)
    layers = routed_layers(model)
    if cfg.method == "pmod":
        return {
            i: VisionRouterReference(layer.router, layer.pmod_ratio, cfg.weight_norm, cfg.scale, cfg.bias, cfg.string)
            for i, layer in layers.items()
        }
    if cfg.method == "mod":
        return {
            i: VisionRouterReference(layer.router, layer.pmod_ratio, "none", 1.0, 1.0, False)
            for i, layer in layers.items()
        }
    if cfg.method == "gamma_mod":
        router = getattr(backbone_for(model).decoder(model), ROUTER_NAME)
        return {i: GammaMoDReference(router, layer.pmod_ratio, cfg.decode_threshold) for i, layer in layers.items()}
    if cfg.method == "fastv":
        return {
            i: FastVReference(cfg.layer, cfg.keep)
            for i in range(cfg.layer, len(backbone_for(model).decoder_layers(model)))
        }
    raise ValueError(f"no reference for method {cfg.method!r}")
