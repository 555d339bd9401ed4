"""The routed decoder layer: the model's own decoder layer that runs attention and MLP on the tokens its method
chose, and applies the method's output rules.

A routed layer is the model's decoder layer (same class, same weights, same parameter names) with a routing rule
and a forward in three named pieces::

    plan:     rule.route() scores the tokens; the forward's plan turns the scores into a selection: index [B, K, 1]
              of the processed tokens in original order, filler slots after them (pmod.core.plan)
    block:    gather hidden states and RoPE cos/sin (kept tokens keep their ORIGINAL positions), then
              h = x + Attn(LN1(x)) over the processed tokens (and this layer's own cache), y = h + scale * MLP(LN2(h)),
              padded (fillers at the end of each row, causal, no mask) or packed (rows end to end)
    combine:  processed: y;  skipped: scale * x (STRing) or x;  scattered back into [B, T, D]

The rule (one per routed layer, made by the method config's ``build``) is all that differs between methods. Nothing
here reads the device on the host: a layer's sizes come from the plan, made once per forward.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pmod.core.cache import RoutedCache, RoutedStaticCache, as_routed_cache
from pmod.core.compaction import gather_positions, sdpa_without_cudnn
from pmod.core.compat import attention_implementation, has_rope_axis, pop_cache_keyword
from pmod.core.deprecation import warn_renamed
from pmod.core.layer_masks import compacted_mask, every_token_mask, static_mask
from pmod.core.packed_attention import (
    ATTENTION_PATHS,
    PackedCacheWriter,
    PackedSdpa,
    cumulative_lengths,
    pack_slots,
    packed_slot_index,
    unpack_slots,
    varlen_flash_available,
)
from pmod.core.plan import ForwardPlan, Selection

#: Decoder-layer submodules a routed layer calls (the Llama family: Llama, Vicuna, Mistral, Qwen2).
REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class RoutingInputs:
    """What the layers need to know about the current chunk of tokens (passed down as the ``routing`` kwarg).

    Attributes:
        vision_mask: bool [B, T], the routable (vision) tokens; None means there are none in this chunk.
        token_mask: bool [B, T], real (non-padding) tokens; None means all tokens are real.
        question_mask: bool [B, T], tokens a method must always process (gamma-MoD's masked routing); None: none
            marked.
        labels: the training labels of this chunk [B, T], when given.
        shared: per-forward scratch the layers of one forward share (e.g. FastV's ranking, computed in layer K-1
            and used by every layer from K).
        routing_losses: where routed layers put their weighted routing losses in a training forward; the model's
            post-hook adds them to the loss. None when nothing collects them.
        plan: the forward's :class:`~pmod.core.plan.ForwardPlan` (made from ``token_mask`` when not given).
    """

    vision_mask: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    question_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    routing_losses: list[torch.Tensor] | None = None
    plan: ForwardPlan | None = None

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = ForwardPlan(self.token_mask)

    def real_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """Bool [B, T] of the chunk's real tokens: ``token_mask``, or every token of ``hidden`` [B, T, D]."""
        if self.token_mask is not None:
            return self.token_mask
        return torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)


@dataclass
class RouteDecision:
    """What a routing rule decided for one chunk: either ``scores`` (the plan keeps the top of the candidates, no
    host sync) or ``processed`` (a mask whose size depends on the data: one host sync).

    Attributes:
        scores: [B, T, 1] float, ranks the candidates of ``candidates`` (highest kept); the rule's ``ratio`` and
            ``rounding`` say how many per row.
        candidates: the plan's candidate kind (:data:`pmod.core.plan.VISION`, or the rule's own name) and
            ``candidate_mask``, a zero-argument function giving its bool [B, T] mask (called once per forward).
        processed: bool [B, T], the tokens the layer runs (padding is removed by the layer).
        token_scale: [B, T, 1] in the hidden states' dtype: processed tokens get ``h + token_scale * m``; 1 on
            tokens the rule does not weight. None: no scaling.
        scale_skipped: skipped tokens become ``token_scale * x`` (STRing); otherwise they pass unchanged.
        weights: [B, T], what :func:`pmod.record_routing` stores (only needed while recording).
        renumber_positions: give the processed tokens positions 0..K-1 instead of their own (a reproduction option
            of gamma-MoD's original code; no KV cache).
    """

    scores: torch.Tensor | None = None
    candidates: str | None = None
    candidate_mask: Any = None
    processed: torch.Tensor | None = None
    token_scale: torch.Tensor | None = None
    scale_skipped: bool = False
    weights: torch.Tensor | None = None
    renumber_positions: bool = False


class RoutingRule:
    """A method's decision for one routed layer. Subclasses implement :meth:`route`.

    ``ratio`` is the share of candidate tokens the layer processes (None: all), for ``pmod.layer_ratios`` and the
    plan; ``rounding`` how a share becomes a count (``schedules.kept_count``).
    """

    ratio: float | None = None
    rounding: str = "floor"

    def route(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        inputs: RoutingInputs,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> RouteDecision | None:
        """Decide which tokens of ``hidden`` [B, T, D] the layer processes; None processes every real token
        exactly like the original layer. ``position_embeddings`` are the layer's RoPE (cos, sin)."""
        raise NotImplementedError


class RoutedLayerMixin:
    """Forward of a routed decoder layer; mixed into the model's own decoder-layer class by
    :func:`make_routed_layer`.

    Attributes set by :func:`make_routed_layer`: ``routing_rule``, ``routed_layer_idx``, ``attention_path``
    (see :func:`set_attention_path`); ``routing_recorder`` is set only inside :func:`pmod.record_routing`.
    """

    routing_rule: RoutingRule
    routed_layer_idx: int
    routing_recorder: Any = None
    attention_path: str = "auto"

    @property
    def routing_ratio(self) -> float | None:
        return self.routing_rule.ratio

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        routing: RoutingInputs | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if "pmod_routing" in kwargs:  # its name in pmod <= 0.2
            warn_renamed("the pmod_routing keyword of a routed layer", "routing")
            routing = kwargs.pop("pmod_routing")
        cache_name, cache = pop_cache_keyword(kwargs, past_key_values)
        cache = None if cache is None else as_routed_cache(cache)
        routing = routing if routing is not None else RoutingInputs()
        decision = self.routing_rule.route(self, hidden_states, routing, position_embeddings)
        selection = self._select(decision, routing)
        if self.routing_recorder is not None and decision is not None:
            processed = self._processed(selection, routing, hidden_states)
            self.routing_recorder(self.routed_layer_idx, processed, decision.weights)
        scale = None if decision is None else decision.token_scale
        if selection is None:  # every token: the original layer (with the method's MLP weights, if any)
            mask = every_token_mask(self, attention_mask, cache, routing.plan, hidden_states)
            return self._block(hidden_states, mask, position_ids, position_embeddings, {cache_name: cache},
                               use_cache, scale, **kwargs)  # fmt: skip
        base = hidden_states * scale if decision.scale_skipped else hidden_states
        if selection.slots == 0:
            return base
        index = selection.index.expand(-1, -1, hidden_states.shape[-1])
        x = hidden_states.gather(1, index)
        scale = None if scale is None else scale.gather(1, selection.index)
        rope = self._gathered_rope(position_embeddings, selection, routing.plan, decision.renumber_positions, cache)
        y = self._run_block(x, selection, rope, cache, cache_name, use_cache, scale, routing.plan, **kwargs)
        if selection.valid is not None:  # filler slots write back the value their token already has
            y = torch.where(selection.valid, y, x * scale if decision.scale_skipped else x)
        # In place where ``base`` is this layer's own tensor (STRing's scaled copy): one pass over [B, T, D] fewer.
        return base.scatter_(1, index, y) if decision.scale_skipped else base.scatter(1, index, y)

    def _select(self, decision: RouteDecision | None, routing: RoutingInputs) -> Selection | None:
        """The processed tokens (None: every token), sized by the forward's plan."""
        if decision is None:
            return None
        if decision.scores is not None:
            rule = self.routing_rule
            return routing.plan.select(decision.candidates, decision.candidate_mask, decision.scores, rule.ratio,
                                       rule.rounding)  # fmt: skip
        processed = decision.processed if routing.token_mask is None else decision.processed & routing.token_mask
        return routing.plan.select_mask(processed)

    def _processed(self, selection: Selection | None, routing: RoutingInputs, hidden: torch.Tensor) -> torch.Tensor:
        """Bool [B, T] of the tokens the layer runs (what :func:`pmod.record_routing` stores)."""
        real = routing.real_mask(hidden)
        if selection is None:
            return real
        valid = torch.ones_like(selection.index, dtype=torch.bool) if selection.valid is None else selection.valid
        return torch.zeros_like(real).scatter(1, selection.index[..., 0], valid[..., 0])

    def _gathered_rope(
        self,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        selection: Selection,
        plan: ForwardPlan,
        renumber: bool,
        cache: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin at the processed tokens' own positions (or at 0..K-1 with ``renumber``)."""
        where = selection.index
        if renumber:
            if cache is not None:
                raise ValueError(
                    "renumber_positions reproduces the original training code and has no KV cache; run the "
                    "model with use_cache=False, or keep renumber_positions off."
                )
            where = torch.arange(selection.slots, device=where.device).view(1, -1, 1).expand_as(where)
        cos, sin = position_embeddings
        if has_rope_axis(cos, 1):  # M-RoPE's [3, B, T, d] (transformers <= ~5.15)
            return gather_positions(cos, where[..., 0], 1), gather_positions(sin, where[..., 0], 1)
        bsz = where.shape[0]
        cos, sin = plan.shared(("rope", id(cos), bsz), lambda: (cos.expand(bsz, -1, -1), sin.expand(bsz, -1, -1)))
        at = where.expand(-1, -1, cos.shape[-1])
        return cos.gather(1, at), sin.gather(1, at)

    def _run_block(
        self,
        x: torch.Tensor,
        selection: Selection,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: RoutedCache | None,
        cache_name: str,
        use_cache: bool | None,
        scale: torch.Tensor | None,
        plan: ForwardPlan,
        **kwargs: Any,
    ) -> torch.Tensor:
        """:meth:`_block` on the compacted batch ``x`` [B, K, D]: padded, or packed when :meth:`_packs` says so.
        Position ids are not passed on: the attention takes RoPE from ``rope``, and flash attention would read
        compacted positions as packed sequences."""
        if isinstance(cache, RoutedStaticCache):
            valid = None if selection.valid is None else selection.valid.view(x.shape[0], 1, 1, selection.slots)
            mask = static_mask(self, cache, valid, selection.slots, x, None)
            return self._block(x, mask, None, rope, {cache_name: cache}, use_cache, scale, **kwargs)
        past = 0 if cache is None else cache.get_seq_length(self.routed_layer_idx)
        if selection.valid is not None and past == 0 and self._packs(x):
            valid = selection.valid[..., 0]
            flat = packed_slot_index(valid, selection.total)
            if cache is not None:
                cache.extend_slots(self.routed_layer_idx, valid[:, None, None, :], selection.slots, x.shape[0])
            y = self._packed_block(x, valid, flat, rope, cache, cache_name, use_cache, scale, **kwargs)
            return unpack_slots(y, flat, x)
        mask = compacted_mask(self, cache, past, selection, plan, x.dtype)
        return self._block(x, mask, None, rope, {cache_name: cache}, use_cache, scale, **kwargs)

    def _block(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: dict[str, Any],
        use_cache: bool | None,
        scale: torch.Tensor | None,
        packing: PackedSdpa | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The decoder layer on ``x``: ``h = x + Attn(LN(x))``, ``h + scale * MLP(LN(h))``. ``cache`` is the cache
        keyword (``{"cache": ...}`` or ``{"past_key_values": ...}``); ``packing`` routes the attention's sdpa call
        to the packed kernel."""
        with sdpa_without_cudnn(), packing or contextlib.nullcontext():
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(x),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **cache,
                **kwargs,
            )
        h = x + attn_out
        m = self.mlp(self.post_attention_layernorm(h))
        return h + m if scale is None else torch.addcmul(h, m, scale)

    def _packs(self, x: torch.Tensor) -> bool:
        """Whether this prefill of rows with unequal token counts runs packed (see :mod:`pmod.core.packed_attention`):
        only with the ``sdpa`` attention and a layer cache that is still empty; ``auto`` also wants CUDA's varlen
        flash kernel and no autograd (its backward is not measured yet)."""
        if self.attention_path == "padded" or attention_implementation(self) != "sdpa":
            return False
        if self.attention_path == "packed":
            return True
        return not torch.is_grad_enabled() and varlen_flash_available(x)

    def _packed_block(
        self,
        x: torch.Tensor,
        valid: torch.Tensor,
        flat: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        cache_name: str,
        use_cache: bool | None,
        scale: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """:meth:`_block` on the valid slots (``flat``) of the compacted batch ``x`` [B, K, D], laid end to end:
        returns [1, N, D]."""
        cos, sin = rope
        return self._block(
            pack_slots(x, flat, 1),
            None,
            None,
            (pack_slots(cos, flat, 1), pack_slots(sin, flat, 1)),
            {cache_name: None if cache is None else PackedCacheWriter(cache, valid, flat)},
            use_cache,
            None if scale is None else pack_slots(scale, flat, 1),
            packing=PackedSdpa(cumulative_lengths(valid), x.shape[1], len(flat)),
            **kwargs,
        )


_ROUTED_CLASSES: dict[type, type] = {}


def routed_layer_class(layer_cls: type) -> type:
    """The routed subclass of a decoder-layer class (created once, importable as
    ``pmod.core.routed_layer.Routed<Name>``).

    Subclassing keeps ``isinstance`` checks of transformers working (``output_hidden_states`` hooks, gradient
    checkpointing) and keeps every parameter name of the original layer.
    """
    if layer_cls not in _ROUTED_CLASSES:
        name = f"Routed{layer_cls.__name__}"
        cls = type(name, (RoutedLayerMixin, layer_cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)  # so pickle/deepcopy can find it by name
        _ROUTED_CLASSES[layer_cls] = cls
    return _ROUTED_CLASSES[layer_cls]


def is_routed_layer(module: nn.Module) -> bool:
    return isinstance(module, RoutedLayerMixin)


def check_layer(layer: nn.Module) -> None:
    """Raise ``TypeError`` naming what is missing when ``layer`` is not a Llama-family decoder layer."""
    missing = [name for name in REQUIRED_SUBMODULES if not hasattr(layer, name)]
    if missing:
        raise TypeError(
            f"{type(layer).__name__} lacks {missing}: routed layers need a Llama-family decoder layer "
            f"({', '.join(REQUIRED_SUBMODULES)})."
        )


def make_routed_layer(layer: nn.Module, layer_idx: int, rule: RoutingRule) -> nn.Module:
    """Turn a decoder layer into a routed layer in place: switch its class and give it its routing rule."""
    check_layer(layer)
    layer.__class__ = routed_layer_class(type(layer))
    layer.routing_rule = rule
    layer.routed_layer_idx = layer_idx
    layer.routing_recorder = None
    layer.attention_path = "auto"
    return layer


def set_attention_path(model: nn.Module, path: str = "auto") -> nn.Module:
    """How the routed layers of ``model`` attend when the rows of a prefill keep unequal numbers of tokens.

    ``"padded"``: pad the compacted rows to the longest and mask (every backend). ``"packed"``: lay the rows end to
    end and attend within each (``sdpa`` only; varlen flash on CUDA in fp16/bf16, one sdpa call per row elsewhere).
    ``"auto"`` (default): packed where the varlen flash kernel runs and no gradient is taken, padded otherwise.
    Decode steps and forwards over a non-empty cache always run padded. Returns ``model``.
    """
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path {path!r} is not one of {', '.join(ATTENTION_PATHS)}.")
    layers = [m for m in model.modules() if is_routed_layer(m)]
    if path == "packed":
        other = {m.self_attn.config._attn_implementation for m in layers} - {"sdpa"}
        if other:
            raise ValueError(
                f"the packed attention path runs on attn_implementation='sdpa', this model uses {sorted(other)}; "
                "load it with attn_implementation='sdpa' (flash_attention_2 already unpads padded rows itself)."
            )
    for layer in layers:
        layer.attention_path = path
    return model
