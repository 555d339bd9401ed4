"""The routed decoder layer: the model's own decoder layer that runs attention and MLP on the tokens its method
chose, and applies the method's output rules.

A routed layer is the model's decoder layer (same class, same weights, same parameter names) with a routing rule
and a forward that processes only a subset of the tokens::

    hidden [B,T,D] + routing inputs (routable / real / question masks, per-forward shared state)
      -> rule.route(): processed mask [B,T], MLP scale, skip scale, recorded weights   (None: process every token)
      -> index [B,K]: processed tokens in original order (shorter rows padded with filler slots)
      -> gather hidden states, RoPE cos/sin and position ids (kept tokens keep their ORIGINAL positions)
      -> h = x + Attn(LN1(x)) over the processed tokens (and this layer's own cache), m = MLP(LN2(h))
      -> processed: h + mlp_scale * m;  skipped: skip_scale * x (or x);  padding: unchanged

The rule (one per routed layer, made by the method config's ``build``) is all that differs between methods.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pmod.core.cache import as_pmod_cache
from pmod.core.compaction import (
    build_attention_mask,
    compact_index,
    gather_positions,
    gather_tokens,
    scatter_tokens,
    sdpa_without_cudnn,
)
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

#: Decoder-layer submodules a routed layer calls (the Llama family: Llama, Vicuna, Mistral, Qwen2).
REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class RoutingInputs:
    """What the layers need to know about the current chunk of tokens (passed down as the ``pmod_routing`` kwarg).

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
    """

    vision_mask: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    question_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    routing_losses: list[torch.Tensor] | None = None


@dataclass
class RouteDecision:
    """What a routing rule decided for one chunk.

    Attributes:
        processed: bool [B, T], the tokens the layer runs (padding is removed by the layer).
        mlp_scale: [B, T] factor on the MLP branch of processed tokens (``h + scale * m``); None: 1.
        skip_scale: [B, T] factor on skipped tokens (``scale * x``); None: skipped tokens pass unchanged.
        weights: [B, T] what :func:`pmod.record_routing` stores (token weights, routing probabilities, scores).
        renumber_positions: give the processed tokens positions 0..K-1 instead of their own (a reproduction option
            of gamma-MoD's original code; no KV cache).
    """

    processed: torch.Tensor
    mlp_scale: torch.Tensor | None = None
    skip_scale: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    renumber_positions: bool = False


class RoutingRule:
    """A method's decision for one routed layer. Subclasses implement :meth:`route`.

    ``ratio`` is the share of routable tokens the layer processes (None: all), for ``pmod.layer_ratios``.
    """

    ratio: float | None = None

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

    Attributes set by :func:`make_routed_layer`: ``routing_rule``, ``pmod_layer_idx``, ``pmod_attention_path``
    (see :func:`set_attention_path`); ``pmod_recorder`` is set only inside :func:`pmod.record_routing`.
    """

    routing_rule: RoutingRule
    pmod_layer_idx: int
    pmod_recorder: Any = None
    pmod_attention_path: str = "auto"

    @property
    def pmod_ratio(self) -> float | None:
        return self.routing_rule.ratio

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        pmod_routing: RoutingInputs | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # transformers >= 5.24 passes the cache as ``cache`` (``past_key_values`` before): take either, and hand it
        # to the attention under the name it came with.
        cache_name = "cache" if "cache" in kwargs else "past_key_values"
        if cache_name == "cache":
            past_key_values = kwargs.pop("cache")
        bsz, seq, _ = hidden_states.shape
        routing = pmod_routing if pmod_routing is not None else RoutingInputs()
        real = routing.token_mask
        if real is None:
            real = torch.ones(bsz, seq, dtype=torch.bool, device=hidden_states.device)
        decision = self.routing_rule.route(self, hidden_states, routing, position_embeddings)
        if decision is None:
            processed = real
        else:
            processed = decision.processed & real
            if self.pmod_recorder is not None:
                self.pmod_recorder(self.pmod_layer_idx, processed, decision.weights)

        if decision is None and routing.token_mask is None:
            most = least = seq  # every token, known without asking the device (decode steps without padding)
            total = bsz * seq
        else:
            # One host sync for three facts: is every token processed (no compaction), is none (nothing to run),
            # how many in all (the size of the packed sequence).
            counts = processed.sum(1)
            most, least, total = (int(v) for v in torch.stack([counts.max(), counts.min(), counts.sum()]).tolist())
        skip_scale = None if decision is None else decision.skip_scale
        if most == 0:
            return hidden_states if skip_scale is None else hidden_states * skip_scale.unsqueeze(-1).to(hidden_states)
        dense = least == seq
        if dense:
            x, slot_valid, index = hidden_states, processed, None
        else:
            index, slot_valid = compact_index(processed, most)
            x = gather_tokens(hidden_states, index)
            cos, sin = position_embeddings
            where = index
            if decision is not None and decision.renumber_positions:
                if past_key_values is not None:
                    raise ValueError(
                        "renumber_positions reproduces the original training code and has no KV cache; run the "
                        "model with use_cache=False, or keep renumber_positions off."
                    )
                where = torch.arange(most, device=index.device).expand_as(index)
            position_embeddings = (gather_positions(cos, where, 1), gather_positions(sin, where, 1))
            if position_ids is not None:
                position_ids = gather_positions(position_ids, where, 0)

        past_valid = None
        if past_key_values is not None:
            past_key_values = as_pmod_cache(past_key_values)
            past_valid = past_key_values.pmod_record_slots(self.pmod_layer_idx, slot_valid)
        mlp_scale = None if decision is None else decision.mlp_scale
        if mlp_scale is not None and not dense:
            mlp_scale = gather_tokens(mlp_scale, index)
        packs = not dense and least < most and self._packs(hidden_states, past_valid)
        if packs:
            flat = packed_slot_index(slot_valid, total)
            y = self._packed_block(x, slot_valid, flat, position_ids, position_embeddings, past_key_values,
                                   cache_name, use_cache, mlp_scale, **kwargs)  # fmt: skip
        else:
            mask = build_attention_mask(
                slot_valid, past_valid, self.self_attn.config._attn_implementation, hidden_states.dtype
            )
            y = self._block(x, mask, position_ids, position_embeddings, {cache_name: past_key_values}, use_cache,
                            mlp_scale, **kwargs)  # fmt: skip
            if dense:
                return y
        base = hidden_states
        if skip_scale is not None:
            base = hidden_states * skip_scale.unsqueeze(-1).to(hidden_states.dtype)
        filler = gather_tokens(base, index)  # unprocessed slots write back their own (scaled) value
        y = unpack_slots(y, flat, filler) if packs else torch.where(slot_valid.unsqueeze(-1), y, filler)
        return scatter_tokens(base, index, y)

    def _block(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: dict[str, Any],
        use_cache: bool | None,
        mlp_scale: torch.Tensor | None,
        packing: PackedSdpa | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The decoder layer on ``x``: ``h = x + Attn(LN(x))``, ``h + mlp_scale * MLP(LN(h))``. ``cache`` is the
        cache keyword (``{"cache": ...}`` or ``{"past_key_values": ...}``); ``packing`` routes the attention's sdpa
        call to the packed kernel."""
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
        if mlp_scale is not None:
            m = mlp_scale.unsqueeze(-1).to(m.dtype) * m
        return h + m

    def _packs(self, hidden_states: torch.Tensor, past_valid: torch.Tensor | None) -> bool:
        """Whether this prefill of rows with unequal token counts runs packed (see :mod:`pmod.core.packed_attention`):
        only with the ``sdpa`` attention and a layer cache that is still empty; ``auto`` also wants CUDA's varlen
        flash kernel and no autograd (its backward is not measured yet)."""
        if self.pmod_attention_path == "padded" or (past_valid is not None and past_valid.shape[1] > 0):
            return False
        if self.self_attn.config._attn_implementation != "sdpa":
            return False
        if self.pmod_attention_path == "packed":
            return True
        return not torch.is_grad_enabled() and varlen_flash_available(hidden_states)

    def _packed_block(
        self,
        x: torch.Tensor,
        slot_valid: torch.Tensor,
        flat: torch.Tensor,
        position_ids: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        cache_name: str,
        use_cache: bool | None,
        mlp_scale: torch.Tensor | None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """:meth:`_block` on the valid slots (``flat``) of the compacted batch ``x`` [B, K, D], laid end to end:
        returns [1, N, D]."""
        cos, sin = position_embeddings
        return self._block(
            pack_slots(x, flat, 1),
            None,
            None if position_ids is None else pack_slots(position_ids, flat, 0),
            (pack_slots(cos, flat, 1), pack_slots(sin, flat, 1)),
            {cache_name: None if cache is None else PackedCacheWriter(cache, slot_valid, flat)},
            use_cache,
            None if mlp_scale is None else pack_slots(mlp_scale, flat, 0),
            packing=PackedSdpa(cumulative_lengths(slot_valid), x.shape[1], len(flat)),
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
    layer.pmod_layer_idx = layer_idx
    layer.pmod_recorder = None
    layer.pmod_attention_path = "auto"
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
        layer.pmod_attention_path = path
    return model
