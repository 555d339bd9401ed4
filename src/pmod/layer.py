"""The p-MoD decoder layer.

A p-MoD layer is the model's own decoder layer (same class, same weights, same parameter names) with a router
added and a forward that processes only a subset of the tokens::

    hidden [B,T,D] + vision mask [B,T]
      -> router logits [B,T] -> per row, top-k vision tokens (k = floor(R * n_vision))
      -> processed index [B,K]: text + kept vision tokens, in original order
      -> gather hidden states, RoPE cos/sin and position ids (kept tokens keep their ORIGINAL positions)
      -> h = x + Attn(LN1(x)) over the processed tokens (and this layer's own cache), m = MLP(LN2(h))
      -> text: h + m;  kept vision: h + w~ * m;  skipped vision: w~ * x (STRing);  padding: unchanged

Rows keep different numbers of tokens; the compacted batch is padded to the largest count K with "filler" slots.
Filler slots point at distinct unprocessed positions of their row, never serve as keys for real tokens, and write
back the value those positions already have, so the scatter is exact.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pmod.cache import as_pmod_cache

if TYPE_CHECKING:
    from pmod.config import PModConfig

#: Decoder-layer submodules a p-MoD layer calls (the Llama family: Llama, Vicuna, Mistral, Qwen2).
REQUIRED_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

#: Attention backends whose masks :func:`build_attention_mask` knows how to build.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class RoutingInputs:
    """What the layers need to know about the current chunk of tokens (passed down as the ``pmod_routing`` kwarg).

    Attributes:
        vision_mask: bool [B, T], the routable (vision) tokens; None means there are none.
        token_mask: bool [B, T], real (non-padding) tokens; None means all tokens are real.
    """

    vision_mask: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None


def token_weights(logits: torch.Tensor, config: PModConfig) -> torch.Tensor:
    """Router logits -> token weights ``w~ = scale * act(logit) + bias`` (TanhNorm by default)."""
    if config.weight_norm == "tanh":
        act = torch.tanh(logits)
    elif config.weight_norm == "sigmoid":
        act = torch.sigmoid(logits)
    else:
        act = logits
    return config.scale * act + config.bias


def select_tokens(logits: torch.Tensor, vision: torch.Tensor, ratio: float) -> torch.Tensor:
    """Per row, keep the ``floor(ratio * n_vision)`` vision tokens with the highest logits.

    Ties are broken by the lower position (a stable sort). Returns a bool mask [B, T] of kept vision tokens.
    """
    if ratio >= 1.0:
        return vision
    n_vision = vision.sum(dim=1)
    # Same float64 arithmetic as ``schedule.kept_count`` so the analytic accounting matches what runs.
    k = torch.floor(n_vision.double() * ratio).long()
    scores = logits.float().masked_fill(~vision, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    positions = torch.arange(vision.shape[1], device=vision.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    return vision & (rank < k[:, None])


def compact_index(processed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices [B, K] of the processed tokens of each row in original order, K = largest count.

    Rows with fewer processed tokens are filled with their first unprocessed positions (all distinct).
    Returns ``(index, slot_valid)``, where ``slot_valid`` [B, K] is False on filler slots.
    """
    counts = processed.sum(dim=1)
    k = int(counts.max())
    # Stable descending sort of 1/0 puts processed tokens first, each group in original order.
    index = torch.sort(processed.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :k]
    slot_valid = torch.arange(k, device=processed.device)[None, :] < counts[:, None]
    return index, slot_valid


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] gathered along dim 1 with index [B, K]."""
    shape = (*index.shape, *x.shape[2:])
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(shape))


def build_attention_mask(
    slot_valid: torch.Tensor,
    past_valid: torch.Tensor | None,
    implementation: str,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """The attention mask for K compacted queries over ``past_valid`` cached keys plus the K new keys.

    Causal in slot order (slot order is original order); invalid keys are masked; each query may attend to itself
    so filler slots never see an all-masked row (which would give NaN).
    """
    bsz, k = slot_valid.shape
    key_valid = slot_valid if past_valid is None else torch.cat([past_valid, slot_valid], dim=1)
    past = key_valid.shape[1] - k
    if implementation.startswith("flash_attention"):
        # FlashAttention takes a 2-D key padding mask and aligns causality bottom-right; fillers sit at the end.
        return None if bool(key_valid.all()) else key_valid.to(torch.int32)
    if implementation not in ("sdpa", "eager"):
        raise NotImplementedError(
            f"p-MoD layers do not support attn_implementation={implementation!r}; load the model with one of "
            f"{SUPPORTED_ATTENTION}."
        )
    if implementation == "sdpa" and (k == 1 or past == 0) and bool(key_valid.all()):
        return None  # sdpa's own causal path is exact here (no padding, no crop of a longer cache)
    q_pos = torch.arange(k, device=slot_valid.device)[:, None] + past
    k_pos = torch.arange(past + k, device=slot_valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]
    allowed |= (k_pos == q_pos)[None]
    allowed = allowed[:, None]  # [B, 1, K, past + K]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def sdpa_without_cudnn() -> contextlib.AbstractContextManager:
    """The sdpa backends the user enabled, minus cuDNN, for the attention of a routed layer.

    cuDNN's sdpa builds an execution plan for every new sequence length. A routed layer caches its own number of
    tokens, so every decode step meets one new length per routed layer instead of one for the whole model, and every
    new prompt length one per routed layer: on an H100 (torch 2.11) the first 128-token p-MoD generation took 97 s
    instead of 4 s, and a p-MoD prefill of a new length 1.0 s instead of 0.15 s. Flash and memory-efficient
    attention have no per-shape set-up.
    """
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return contextlib.nullcontext()
    backends = [
        backend
        for backend, enabled in (
            (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
            (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
            (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
        )
        if enabled
    ]
    return sdpa_kernel(backends) if backends else contextlib.nullcontext()


class PModLayerMixin:
    """Forward of a p-MoD decoder layer; mixed into the model's own decoder-layer class by :func:`make_pmod_layer`.

    Attributes set by :func:`make_pmod_layer`: ``router`` (``Linear(hidden, 1)``), ``pmod_ratio``,
    ``pmod_layer_idx``, ``pmod_config``; ``pmod_recorder`` is set only inside :func:`pmod.record_routing`.
    """

    router: nn.Linear
    pmod_ratio: float
    pmod_layer_idx: int
    pmod_config: PModConfig
    pmod_recorder: Any = None

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
        vision = routing.vision_mask
        # Text-only inference (every decode step): nothing to route, so skip the router and the selection.
        # Training keeps the router in the graph so that data-parallel wrappers see it used in every step.
        text_only = vision is None and self.pmod_recorder is None and not torch.is_grad_enabled()
        if text_only:
            processed, weights, kept_vision = real, None, None
            dense = routing.token_mask is None or bool(real.all())
        else:
            vision = torch.zeros_like(real) if vision is None else vision & real
            logits = self.router(hidden_states).squeeze(-1).float()
            weights = token_weights(logits, self.pmod_config)
            kept_vision = select_tokens(logits, vision, self.pmod_ratio)
            processed = (real & ~vision) | kept_vision
            if self.pmod_recorder is not None:
                self.pmod_recorder(self.pmod_layer_idx, processed, weights)
            dense = bool(processed.all())  # every token of every row processed: no gather/scatter needed

        if dense:
            x, slot_valid = hidden_states, processed  # all True
        else:
            index, slot_valid = compact_index(processed)
            x = _gather_tokens(hidden_states, index)
            cos, sin = position_embeddings
            position_embeddings = (
                _gather_tokens(cos.expand(bsz, *cos.shape[1:]), index),
                _gather_tokens(sin.expand(bsz, *sin.shape[1:]), index),
            )
            if position_ids is not None:
                position_ids = position_ids.expand(bsz, seq).gather(1, index)

        past_valid = None
        if past_key_values is not None:
            past_key_values = as_pmod_cache(past_key_values)
            past_valid = past_key_values.pmod_record_slots(self.pmod_layer_idx, slot_valid)
        mask = build_attention_mask(
            slot_valid, past_valid, self.self_attn.config._attn_implementation, hidden_states.dtype
        )

        with sdpa_without_cudnn():
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(x),
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{cache_name: past_key_values},
                **kwargs,
            )
        h = x + attn_out
        m = self.mlp(self.post_attention_layernorm(h))

        if text_only:
            if dense:
                return h + m
            y, base = h + m, hidden_states
        else:
            # Kept vision tokens: only the MLP branch is reweighted. Skipped ones (STRing): w~ * x.
            mlp_scale = torch.where(kept_vision, weights, 1.0)
            if dense:
                return h + mlp_scale.unsqueeze(-1).to(m.dtype) * m
            y = h + _gather_tokens(mlp_scale, index).unsqueeze(-1).to(m.dtype) * m
            base = hidden_states
            if self.pmod_config.string:
                skip_scale = torch.where(vision & ~kept_vision, weights, 1.0)
                base = hidden_states * skip_scale.unsqueeze(-1).to(x.dtype)
        y = torch.where(slot_valid.unsqueeze(-1), y, _gather_tokens(base, index))
        return base.scatter(1, index.unsqueeze(-1).expand_as(y), y)


_PMOD_CLASSES: dict[type, type] = {}


def pmod_layer_class(layer_cls: type) -> type:
    """The p-MoD subclass of a decoder-layer class (created once, importable as ``pmod.layer.PMod<Name>``).

    Subclassing keeps ``isinstance`` checks of transformers working (``output_hidden_states`` hooks, gradient
    checkpointing) and keeps every parameter name of the original layer.
    """
    if layer_cls not in _PMOD_CLASSES:
        name = f"PMod{layer_cls.__name__}"
        cls = type(name, (PModLayerMixin, layer_cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, cls)  # so pickle/deepcopy can find it by name
        _PMOD_CLASSES[layer_cls] = cls
    return _PMOD_CLASSES[layer_cls]


def is_pmod_layer(module: nn.Module) -> bool:
    return isinstance(module, PModLayerMixin)


def make_pmod_layer(layer: nn.Module, layer_idx: int, ratio: float, config: PModConfig) -> nn.Module:
    """Turn a decoder layer into a p-MoD layer in place: add a zero-initialised router and switch its forward."""
    missing = [name for name in REQUIRED_SUBMODULES if not hasattr(layer, name)]
    if missing:
        raise TypeError(
            f"{type(layer).__name__} lacks {missing}: p-MoD layers need a Llama-family decoder layer "
            f"({', '.join(REQUIRED_SUBMODULES)})."
        )
    weight = layer.input_layernorm.weight
    router = nn.Linear(weight.shape[-1], 1, bias=config.router_bias, device=weight.device, dtype=weight.dtype)
    nn.init.zeros_(router.weight)
    if router.bias is not None:
        nn.init.zeros_(router.bias)
    layer.__class__ = pmod_layer_class(type(layer))
    layer.router = router
    layer.pmod_ratio = float(ratio)
    layer.pmod_layer_idx = layer_idx
    layer.pmod_config = config
    layer.pmod_recorder = None
    return layer
