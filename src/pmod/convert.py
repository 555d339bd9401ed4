"""Turn a Hugging Face model into a p-MoD model, reload one, and record its routing decisions.

Supported: ``LlavaForConditionalGeneration`` (LLaVA-1.5), ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT) and
bare Llama-family decoders (``LlamaForCausalLM``/``LlamaModel``, Mistral, Qwen2). Conversion happens in place:
each routed decoder layer keeps its class (a p-MoD subclass of it), its weights and parameter names, and gains a
``router``. The p-MoD settings are stored in ``config.json`` under ``"pmod"``; :func:`load` restores the model
from a folder, routers included.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from pmod.config import PModConfig
from pmod.layer import RoutingInputs, is_pmod_layer, make_pmod_layer

#: Top-level model classes ``convert`` accepts, by name.
MULTIMODAL_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
DECODER_CLASSES = (
    "LlamaForCausalLM",
    "LlamaModel",
    "MistralForCausalLM",
    "MistralModel",
    "Qwen2ForCausalLM",
    "Qwen2Model",
)
SUPPORTED_CLASSES = MULTIMODAL_CLASSES + DECODER_CLASSES


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported model."""
    name = type(model).__name__
    if name in MULTIMODAL_CLASSES:
        return model.model.language_model.layers
    if name.endswith("ForCausalLM"):
        return model.model.layers
    return model.layers


def pmod_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The p-MoD layers of a model, by layer index (empty for a dense model)."""
    if type(model).__name__ not in SUPPORTED_CLASSES:
        return {}
    return {i: layer for i, layer in enumerate(decoder_layers(model)) if is_pmod_layer(layer)}


def is_pmod_model(model: nn.Module) -> bool:
    return bool(pmod_layers(model))


def get_pmod_config(model: nn.Module) -> PModConfig | None:
    """The model's :class:`PModConfig`, or None for a model that is not p-MoD."""
    data = getattr(model.config, "pmod", None)
    return None if data is None else PModConfig.from_dict(data)


def layer_ratios(model: nn.Module) -> list[float | None]:
    """Per-layer retention of a converted model (None = dense layer)."""
    layers = decoder_layers(model)
    return [layer.pmod_ratio if is_pmod_layer(layer) else None for layer in layers]


def convert(model: nn.Module, config: PModConfig | None = None) -> nn.Module:
    """Convert a supported Hugging Face model into a p-MoD model, in place; returns the model.

    With zero-initialised routers and TanhNorm every token weight is 1, so the converted model differs from the
    original only in which vision tokens each p-MoD layer processes (and not at all with ratio 1 everywhere).

    For LLaVA models the routed tokens are the image tokens (``config.image_token_id``). A bare decoder takes a
    ``vision_mask`` keyword (bool [batch, seq]) in its forward; without it every token is text.
    """
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise TypeError(
            f"pmod.convert does not support {name}. Supported model classes: {', '.join(SUPPORTED_CLASSES)}. "
            f"Load the model with one of them (e.g. LlavaForConditionalGeneration.from_pretrained)."
        )
    if is_pmod_model(model):
        raise ValueError("This model is already a p-MoD model; convert the original model, not a converted one.")
    if getattr(model.config, "pmod", None) is not None:
        raise ValueError(
            "This model's config.json says it is a p-MoD model, but its layers are not converted: it was loaded "
            "without pmod, which drops the trained routers. Load it with pmod.load(path) instead."
        )
    return _convert(model, config or PModConfig())


def _convert(model: nn.Module, config: PModConfig) -> nn.Module:
    layers = decoder_layers(model)
    ratios = config.layer_ratios(len(layers))
    for i, ratio in enumerate(ratios):
        if ratio is not None:
            make_pmod_layer(layers[i], i, ratio, config)
    model.config.pmod = config.to_dict()
    model.register_forward_pre_hook(_RoutingHook(model), with_kwargs=True)
    return model


class _RoutingHook:
    """Forward pre-hook of the top-level model: works out which tokens are routable and which are padding, and
    hands both to the decoder layers as the ``pmod_routing`` keyword (which transformers passes down to them).

    A keyword, not state on the model, so that gradient checkpointing replays each layer with its own inputs.
    """

    def __init__(self, model: nn.Module) -> None:
        self.signature = inspect.signature(model.forward)
        ids = [getattr(model.config, key, None) for key in ("image_token_id", "video_token_id")]
        self.routable_ids = [i for i in ids if i is not None]

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        vision_mask = kwargs.pop("vision_mask", None)
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        input_ids, inputs_embeds = bound.get("input_ids"), bound.get("inputs_embeds")
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            return args, kwargs
        bsz, seq = reference.shape[:2]

        if vision_mask is not None:
            if tuple(vision_mask.shape) != (bsz, seq):
                raise ValueError(
                    f"vision_mask has shape {tuple(vision_mask.shape)} but the input is [{bsz}, {seq}]; pass a bool "
                    f"mask of shape [batch, seq] for the tokens of this call (True = vision token)."
                )
            vision_mask = vision_mask.to(device=reference.device, dtype=torch.bool)
        elif input_ids is not None and self.routable_ids:
            vision_mask = torch.isin(input_ids, torch.tensor(self.routable_ids, device=input_ids.device))
            if not bool(vision_mask.any()):
                vision_mask = None  # text only (every decode step): lets the layers skip routing; one check here

        token_mask = bound.get("attention_mask")
        if token_mask is not None:
            if token_mask.dim() != 2:
                raise ValueError(
                    f"p-MoD models take a 2-D padding attention_mask [batch, past + seq], got {token_mask.dim()}-D; "
                    f"pass the tokenizer's attention_mask (1 = token, 0 = padding)."
                )
            token_mask = token_mask[:, -seq:].to(device=reference.device, dtype=torch.bool)
        kwargs["pmod_routing"] = RoutingInputs(vision_mask=vision_mask, token_mask=token_mask)
        return args, kwargs


def load(path: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a p-MoD model saved with ``save_pretrained``: the base class from ``config.json``, converted with the
    stored :class:`PModConfig`, routers and all weights loaded by transformers' own ``from_pretrained``.

    Keyword arguments (``dtype``, ``device_map``, ``attn_implementation``, ...) go to ``from_pretrained``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained.")
    config = transformers.AutoConfig.from_pretrained(path)
    data = getattr(config, "pmod", None)
    if data is None:
        raise ValueError(
            f"{path} holds a model without p-MoD settings; load it with transformers and call pmod.convert(model)."
        )
    archs = getattr(config, "architectures", None) or []
    base = getattr(transformers, archs[0], None) if archs else None
    if base is None or base.__name__ not in SUPPORTED_CLASSES:
        raise TypeError(f"{path} has architecture {archs}; pmod supports {', '.join(SUPPORTED_CLASSES)}.")
    pmod_config = PModConfig.from_dict(data)

    def init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        _convert(self, pmod_config)

    # A subclass that converts itself on construction lets from_pretrained load the routers with every other
    # weight (including its own checkpoint key mappings); the class is switched back once loaded.
    loader = type(base.__name__, (base,), {"__init__": init, "__module__": base.__module__})
    model = loader.from_pretrained(path, **from_pretrained_kwargs)
    model.__class__ = base
    return model


@dataclass
class RoutingRecord:
    """Routing decisions recorded by :func:`record_routing`, one entry per forward, keyed by layer index.

    ``processed[l][i]`` is the bool mask [batch, seq] of tokens layer ``l`` processed in the i-th forward;
    ``weights[l][i]`` the token weights ``w~`` [batch, seq] (float32).
    """

    processed: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    weights: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, layer_idx: int, processed: torch.Tensor, weights: torch.Tensor) -> None:
        self.processed[layer_idx].append(processed.detach())
        self.weights[layer_idx].append(weights.detach().float())


@contextlib.contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Record which tokens each p-MoD layer processes, and the router weights, for the forwards inside::

    with pmod.record_routing(model) as rec:
        model(**batch)
    rec.processed[8][0]  # bool [batch, seq] of layer 8, first forward
    """
    layers = pmod_layers(model)
    if not layers:
        raise ValueError("record_routing needs a p-MoD model; convert it with pmod.convert(model) first.")
    record = RoutingRecord()
    for layer in layers.values():
        layer.pmod_recorder = record
    try:
        yield record
    finally:
        for layer in layers.values():
            layer.pmod_recorder = None
