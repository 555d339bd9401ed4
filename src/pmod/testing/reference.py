"""Independent references of the routing methods: a plain full-length forward of the *unconverted* model in which
every layer runs over all T tokens with explicit masks, and each method's rule is written out again here (Python
sorts per row, eager attention probabilities) without ``pmod.core`` or ``pmod.methods``.

In a routed layer the attention mask removes unprocessed tokens as keys (their own query rows are discarded), then
the output rules are applied token by token: processed ``h + s * m`` (``s`` the method's MLP scale), skipped
``w * x`` (p-MoD's STRing) or ``x``. Tests and ``benchmarks/gpu_check.py`` compare the compacted execution with it.

The constants the papers fix are written here, next to the equation or table that fixes them, and never read from
pmod's configs or layers: a reference that read them would agree with the code whatever their value. What the
reference takes from a model are its router weights and the choices a test writes into its config (explicit ratios
and layer lists, the schedule kind, the weight norm, switches); it computes the per-layer ratios itself. A model whose
config holds a value other than the paper's is refused unless the test declares that value
(``reference_rules(model, decode_threshold=0.7)``), so a wrong default fails every reference test by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pmod.testing.reference_schedules import RATIOS

#: TanhNorm ``w~ = alpha * tanh(w) + 1``: p-MoD supplementary D.2 ("we set the gating factor alpha in TanhNorm to
#: 0.2") and C.2 (``X' = alpha tanh(w) T(X) + X``: the token itself enters with weight 1). The sigmoid and identity
#: norms are ablation variants with pmod's documented (scale, bias), which no paper text fixes.
WEIGHT_NORMS = {"tanh": (0.2, 1.0), "sigmoid": (1.0, 0.5), "none": (1.0, 0.0)}

#: Vanilla MoD as the p-MoD paper runs it (supplementary C.2: "no normalization", Table 3 row 1; the original code's
#: ``none`` norm): the raw logit ``w`` weights the MLP branch as ``w + 1``; no STRing.
MOD_NORM = ("none", 1.0, 1.0, False)

#: Settings the papers fix, per method (the name is the config field). A model whose config disagrees is refused
#: unless the test passes the value to :func:`reference_rules`.
PAPER = {
    "pmod": {
        # PRD: R_l = 0.5 cos(pi l / (L-1)) + beta with "the shift factor beta in PRD" 0.5 (p-MoD supplementary
        # D.2); the thresholds of Eq. (6) (D.3) at max 0.85 and min 0.15, the released checkpoints' schedule
        # ("mod_target_layers": "shiftedcos_decay_0.85_0.15"; the main text's values are not in these texts).
        "beta": 0.5,
        "max_ratio": 0.85,
        "min_ratio": 0.15,
    },
    "gamma_mod": {
        # gamma-MoD 5.2: "the fourth largest ARank value is used as the threshold"; "the coefficient for the
        # routing loss is set to 0.01".
        "threshold_rank": 4,
        "routing_loss_weight": 0.01,
        # Eq. (2) routes x_j when R(x_j) >= delta_s; with the binary softmax of Eq. (7) that is p >= 0.5 (the
        # router prefers processing to skipping).
        "decode_threshold": 0.5,
        # The original evaluation code's prefill threshold (prefill_rule="threshold"); not in the paper's text.
        "prefill_threshold": 0.005,
    },
    "fastv": {
        # "An Image is Worth 1/2 Tokens After Layer 2" (FastV, ECCV 2024): K = 2, keep R = 50%.
        "layer": 2,
        "keep": 0.5,
    },
}


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
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None  # the RoPE the layers run with (set by run_layers)

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
        logits = nn.functional.linear(x, self.router.weight, self.router.bias).squeeze(-1).float()
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
    not question; prompt positions keep the top ``floor(n_routable * ratio)`` by ``p`` (or, with
    ``prefill_threshold``, every one with ``p > prefill_threshold``), decoded positions keep ``p >= threshold``;
    kept ``h + p m``, skipped ``x``. ``renumber_positions``: the processed tokens of a row take positions 0..K-1
    (the original code's), see :func:`run_layers`."""

    def __init__(
        self,
        router: nn.Module,
        ratio: float,
        decode_threshold: float = 0.5,
        prefill_threshold: float | None = None,
        renumber_positions: bool = False,
    ) -> None:
        self.router, self.ratio, self.threshold = router, ratio, decode_threshold
        self.prefill_threshold, self.renumber_positions = prefill_threshold, renumber_positions

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
            if self.prefill_threshold is None:
                kept[b, _top(p[b], prompt, math.floor(len(prompt) * self.ratio))] = True
            else:
                kept[b, [pos for pos in prompt if p[b, pos] > self.prefill_threshold]] = True
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
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """The decoder layers over the full sequence ``x`` [B, T, D] with explicit masks, each layer in ``rules`` applying
    its reference rule; ``between[i]`` is added after layer i (what the model adds there, e.g. Qwen3-VL's deepstack).

    A rule with ``renumber_positions`` runs its layer with positions ``rotary(ids)``, ids [B, T] counting each row's
    processed tokens from 0 (the other tokens' queries are discarded and they are no keys, so theirs do not matter).
    """
    bsz, seq = x.shape[:2]
    device = x.device
    ctx.cos_sin = cos_sin
    causal = torch.ones(seq, seq, device=device).tril().bool()
    eye = torch.eye(seq, dtype=torch.bool, device=device)
    for idx, layer in enumerate(layers):
        rule = rules.get(idx)
        keep, mlp_scale, skip_scale = ctx.real, None, None
        layer_cos_sin = cos_sin
        if rule is not None:
            keep, mlp_scale, skip_scale, _ = rule.decide(layer, idx, x, ctx)
            if processed is not None and idx in processed:
                keep = processed[idx].to(device).bool() & ctx.real
            if getattr(rule, "renumber_positions", False):
                if rotary is None:
                    raise ValueError("renumber_positions needs the model's rotary embedding (reference_logits)")
                layer_cos_sin = rotary((keep.long().cumsum(1) - 1).clamp(min=0))
        allowed = (causal[None] & keep[:, None, :] | eye[None])[:, None]
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(x.dtype).min)  # additive: works for eager and sdpa
        attn_out, probs = layer.self_attn(
            layer.input_layernorm(x), attention_mask=mask, position_embeddings=layer_cos_sin
        )
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
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [B, T, vocab] of the unconverted Llama-family ``dense_model`` (``LlamaForCausalLM``; eager attention
    for FastV, whose rule reads attention probabilities) with each layer in ``rules`` applying its reference rule, at
    ``position_ids`` (default 0..T-1 in every row). ``processed`` (layer -> bool [B, T]) imposes the processed tokens
    instead of the rule's choice (its scales are kept), e.g. the decisions a bf16 run recorded, so that arithmetic
    can be compared where near-ties could flip.
    """
    lm = dense_model.model
    ctx = Context(attention_mask.bool(), vision_mask.bool(), question_mask, labels, prompt_length)
    x = lm.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None].expand_as(input_ids)
    cos_sin = lm.rotary_emb(x, position_ids)
    hidden = run_layers(lm.layers, x, cos_sin, ctx, rules, processed, rotary=lambda ids: lm.rotary_emb(x, ids))
    return dense_model.lm_head(lm.norm(hidden))


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
    prompt_length: int | None = None,
) -> torch.Tensor:
    """Logits of a multimodal ``dense_model`` whose ``decoder`` layers apply the reference ``rules``, from the layer
    inputs the dense model itself computed (:func:`capture_decoder_inputs`): embeddings, M-RoPE and deepstack come
    from transformers, the routing from here; ``prompt_length`` as :func:`reference_logits`' (decoded from there)."""
    ctx = Context(attention_mask.bool(), vision_mask.bool(), prompt_length=prompt_length)
    x = run_layers(decoder.layers, captured.hidden, captured.cos_sin, ctx, rules, between=captured.between)
    return dense_model.lm_head(decoder.norm(x))


def paper_settings(cfg: Any, declared: Mapping[str, Any], paper: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The paper's settings of ``cfg``'s method (``paper``, default :data:`PAPER`'s), with the values the test
    ``declared`` instead; refuses a config that holds anything else, naming the field."""
    paper = PAPER.get(cfg.method, {}) if paper is None else paper
    unknown = sorted(set(declared) - set(paper))
    if unknown:
        raise ValueError(f"reference: {unknown} are no paper settings of {cfg.method}; known: {sorted(paper)}")
    settings = {**paper, **declared}
    for name, value in settings.items():
        if getattr(cfg, name) != value:
            raise ValueError(
                f"reference: the model's {cfg.method} {name} is {getattr(cfg, name)!r} but the reference uses "
                f"{value!r} (the paper's: {paper[name]!r}); pass {name}= to reference_rules if the test sets it"
            )
    return settings


def _vision_rule_settings(cfg: Any) -> tuple[str, float, float, bool]:
    """(norm, scale, bias, STRing) of a p-MoD or MoD config: the norm and STRing as the test chose them, scale and
    bias as set or else :data:`WEIGHT_NORMS`' (never the config's defaults)."""
    if cfg.method == "mod":
        return MOD_NORM
    scale, bias = WEIGHT_NORMS[cfg.weight_norm]
    scale = scale if cfg.weight_scale is None else cfg.weight_scale
    bias = bias if cfg.weight_bias is None else cfg.weight_bias
    if (cfg.scale, cfg.bias) != (scale, bias):
        raise ValueError(
            f"reference: the model's {cfg.weight_norm} weight norm has scale/bias {cfg.scale}/{cfg.bias}, the "
            f"reference {scale}/{bias} (p-MoD supplementary D.2 for tanh)"
        )
    return cfg.weight_norm, scale, bias, cfg.string


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
    """:func:`reference_logits` of p-MoD / MoD: ``routers`` per routed layer, ``ratios`` per layer (the test's own),
    ``cfg`` the method's config, read for the test's choices only (``weight_norm``, a set ``weight_scale`` /
    ``weight_bias``, ``string``); the norm constants are :data:`WEIGHT_NORMS`' (MoD: :data:`MOD_NORM`)."""
    act, scale, bias, string = _vision_rule_settings(cfg)
    rules = {
        i: VisionRouterReference(routers[i], r, act, scale, bias, string) for i, r in enumerate(ratios) if r is not None
    }
    return reference_logits(dense_model, rules, input_ids, attention_mask, vision_mask, processed=processed)


def reference_ratios(cfg: Any, num_layers: int, declared: Mapping[str, Any] | None = None) -> list[float | None]:
    """Per-layer ratios (None = dense) of a method config, computed here: PRD and the linear decay from their
    formulas with the paper's constants, MoD's layer sets, gamma-MoD's ``1 - skip_ratio`` on its layers (chosen
    below the 4th largest ARank when given as ARank), FastV's ``keep`` from layer K on. Layer 0 is always dense."""
    paper = paper_settings(cfg, declared or {})
    if cfg.method not in RATIOS:
        raise ValueError(f"no reference for method {cfg.method!r}")
    return RATIOS[cfg.method](cfg, num_layers, paper)


def _checked(model: nn.Module, cfg: Any, declared: Mapping[str, Any], scoring_layer: bool = False) -> tuple[
        dict[str, Any], list[float | None], dict[int, nn.Module]]:  # fmt: skip
    """(paper settings, per-layer ratios, the model's routed layers), once the model is known to route exactly the
    layers the reference derives (``scoring_layer``: and the one before the first, FastV's ranking layer)."""
    from pmod.core.backbone import backbone_for
    from pmod.core.convert import routed_layers

    paper = paper_settings(cfg, declared)
    ratios = reference_ratios(cfg, len(backbone_for(model).decoder_layers(model)), declared)
    routed = {i for i, r in enumerate(ratios) if r is not None}
    layers = routed_layers(model)
    have = set(layers) - ({paper["layer"] - 1} if scoring_layer else set())
    if have != routed:
        raise ValueError(f"reference: the model routes layers {sorted(have)}, the reference {sorted(routed)}")
    return paper, ratios, layers


def _vision_router_rules(model: nn.Module, cfg: Any, declared: Mapping[str, Any]) -> dict[int, Any]:
    _, ratios, layers = _checked(model, cfg, declared)
    settings = _vision_rule_settings(cfg)
    return {i: VisionRouterReference(layers[i].router, r, *settings) for i, r in enumerate(ratios) if r is not None}


def _gamma_mod_rules(model: nn.Module, cfg: Any, declared: Mapping[str, Any]) -> dict[int, Any]:
    from pmod.core.backbone import backbone_for
    from pmod.methods.gamma_mod import ROUTER_NAME

    paper, ratios, _ = _checked(model, cfg, declared)
    router = getattr(backbone_for(model).decoder(model), ROUTER_NAME)
    prefill = paper["prefill_threshold"] if cfg.prefill_rule == "threshold" else None
    settings = (paper["decode_threshold"], prefill, cfg.renumber_positions)
    return {i: GammaMoDReference(router, r, *settings) for i, r in enumerate(ratios) if r is not None}


def _fastv_rules(model: nn.Module, cfg: Any, declared: Mapping[str, Any]) -> dict[int, Any]:
    paper, ratios, _ = _checked(model, cfg, declared, scoring_layer=True)
    return {i: FastVReference(paper["layer"], r) for i, r in enumerate(ratios) if r is not None}


def _pruning_rules(model: nn.Module, cfg: Any, declared: Mapping[str, Any]) -> dict[int, Any]:
    from pmod.testing.reference_pruning import pruning_rules  # written in their own module

    return pruning_rules(model, cfg, declared)


#: Per method (by registry name; apart from pmod's registry, whose code these check): a converted model's rules.
RULES = {"pmod": _vision_router_rules, "mod": _vision_router_rules, "gamma_mod": _gamma_mod_rules,
         "fastv": _fastv_rules, "pdrop": _pruning_rules, "dart": _pruning_rules}  # fmt: skip


def reference_rules(model: nn.Module, **declared: Any) -> dict[int, Any]:
    """The reference rule of every routed layer of a converted model: the model's routers, the test's choices from
    its config, the per-layer ratios of :func:`reference_ratios` and the paper's constants (:data:`PAPER`;
    ``declared`` replaces them where a test sets another value on purpose)."""
    from pmod.core.convert import get_method_config

    cfg = get_method_config(model)
    if cfg.method not in RULES:
        raise ValueError(f"no reference for method {cfg.method!r}")
    return RULES[cfg.method](model, cfg, declared)
