"""Turn a Hugging Face model into a routed model with any method, reload one, and record its routing decisions.

``convert(model, config)`` puts a backbone adapter (where the layers are, which tokens are routable) and a method
config (which layers route, and how) together. Conversion happens in place: each routed decoder layer keeps its
class (a routed subclass of it), its weights and parameter names, and gains its method's rule (and router). The
method and its settings are stored in ``config.json`` (key ``"pmod_method"``); :func:`load` restores the model from
a folder, routers included, and also reads folders saved by pmod 0.1.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from pmod.core import recording
from pmod.core.backbone import (
    BackboneAdapter,
    backbone_for,
    backbone_for_model_type,
    find_backbone,
    supported_model_types,
)
from pmod.core.compat import CACHE_NAME, full_attention_mask, has_vision_inputs
from pmod.core.config import DEFAULT_METHOD, MethodConfig, method_class, store_method_config, stored_method_config
from pmod.core.errors import UserError
from pmod.core.files import check_complete
from pmod.core.plan import ForwardPlan
from pmod.core.routed_layer import RoutingInputs, is_routed_layer, make_routed_layer
from pmod.core.weight_files import check_weight_files

logger = logging.getLogger(__name__)


def routed_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The routed layers of a model, by layer index (empty for a dense or unsupported model)."""
    adapter = find_backbone(model)
    if adapter is None:
        return {}
    return {i: layer for i, layer in enumerate(adapter.decoder_layers(model)) if is_routed_layer(layer)}


def is_routed_model(model: nn.Module) -> bool:
    return bool(routed_layers(model))


def get_method_config(model: nn.Module) -> MethodConfig | None:
    """The model's method config (``PModConfig``, ``MoDConfig``, ...), or None for a dense model."""
    return stored_method_config(model.config)


def layer_ratios(model: nn.Module) -> list[float | None]:
    """Per-layer share of the routable tokens each layer processes (None = dense layer)."""
    layers = backbone_for(model).decoder_layers(model)
    return [layer.routing_ratio if is_routed_layer(layer) else None for layer in layers]


def convert(model: nn.Module, config: MethodConfig | None = None) -> nn.Module:
    """Convert a supported Hugging Face model in place with a routing method; returns the model.

    ``config`` is any method config (``pmod.PModConfig()`` by default, the paper's p-MoD).

    When does the converted model equal its base? Only when every routed layer processes every token: a ratio of 1
    everywhere (e.g. ``PModConfig(schedule="constant", ratio=1.0)`` or ``MoDConfig(ratio=1.0)``) with zero routers,
    whose weights are exactly 1. At any smaller ratio, zero routers still keep only the first
    ``floor(R * n_vision)`` vision tokens of each routed layer (ties are broken by position), so the outputs differ.

    For LLaVA models the
    routable tokens are the image tokens (``config.image_token_id``); a bare decoder takes a ``vision_mask`` keyword
    (bool [batch, seq]) in its forward, without which every token is text. A ``question_mask`` keyword (bool
    [batch, seq] or [batch, past + seq]) marks tokens a method must always process (gamma-MoD's masked routing).
    """
    adapter = backbone_for(model)
    if is_routed_model(model) or getattr(model, "_routing_hook", None) is not None:
        raise ValueError("This model is already converted; convert the original model, not a converted one.")
    if stored_method_config(model.config) is not None:
        raise ValueError(
            "This model's config.json names a routing method, but its layers are not converted: it was loaded "
            "without pmod, which drops the trained routers. Load it with pmod.load(path) instead."
        )
    if config is None:
        config = method_class(DEFAULT_METHOD)()
    if not isinstance(config, MethodConfig):
        raise TypeError(f"pmod.convert takes a method config (e.g. pmod.PModConfig()), got {type(config).__name__}.")
    return _convert(model, config, adapter)


def _convert(model: nn.Module, config: MethodConfig, adapter: BackboneAdapter) -> nn.Module:
    layers = adapter.decoder_layers(model)
    config = config.resolved(len(layers))
    rules = config.build(adapter.decoder(model), layers)
    for i, rule in sorted(rules.items()):
        make_routed_layer(layers[i], i, rule)
    store_method_config(model.config, config)
    hook = _RoutingHook(model, adapter)
    model.register_forward_pre_hook(hook.before, with_kwargs=True)
    model.register_forward_hook(hook.after, with_kwargs=True)
    model._routing_hook = hook
    config.attach(model, adapter)  # work before the decoder (VisionZip); its pre-hook runs before the one above
    return model


class _RoutingHook:
    """Hooks of the top-level model. Before the forward: work out which tokens are routable, which are padding and
    which are question tokens, and hand that to the decoder layers as the ``routing`` keyword (which
    transformers passes down to them). After it: add the routing losses the layers collected to the loss.

    A keyword, not state on the model, so that gradient checkpointing replays each layer with its own inputs.
    """

    def __init__(self, model: nn.Module, adapter: BackboneAdapter) -> None:
        self.positional = list(inspect.signature(model.forward).parameters)
        self.routable_ids = adapter.routable_token_ids(model.config)
        rules = [layer.routing_rule for layer in adapter.decoder_layers(model) if is_routed_layer(layer)]
        # Every (ratio, rounding) the routed layers use: the plan sizes all of them at once.
        self.ratios = tuple(dict.fromkeys((r.ratio, r.rounding) for r in rules if r.ratio is not None))
        self._ids: dict[torch.device, torch.Tensor] = {}
        self.current: RoutingInputs | None = None
        self.last_routing_loss: torch.Tensor | None = None

    def before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        vision_mask = kwargs.pop("vision_mask", None)
        question_mask = kwargs.pop("question_mask", None)
        counts = {name: kwargs.pop(key) for name, key in (("vision", "vision_counts"), ("real", "real_counts"))
                  if kwargs.get(key) is not None}  # fmt: skip
        bound = {**dict(zip(self.positional, args)), **kwargs}  # not inspect's bind: torch.compile traces this
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
        elif input_ids is not None and self.routable_ids and (seq > 1 or has_vision_inputs(kwargs)):
            # A one-token chunk without images (every decode step) is text: known without reading it on the host.
            vision_mask = torch.isin(input_ids, self._routable_ids(input_ids.device))

        mask = full_attention_mask(bound.get("attention_mask"))
        token_mask, total = real_tokens(mask, seq, bound.get(CACHE_NAME), reference.device)
        if question_mask is not None:
            # generate() passes the prompt's mask again at every decode step: it only describes the prompt chunk.
            width = question_mask.shape[-1]
            question_mask = question_mask[:, -seq:] if width in (seq, total) else None
            if question_mask is not None:
                question_mask = question_mask.to(device=reference.device, dtype=torch.bool)
        labels = bound.get("labels")
        collect = model.training and torch.is_grad_enabled()
        self.current = RoutingInputs(
            plan=ForwardPlan(token_mask, self.ratios, counts),
            vision_mask=vision_mask,
            token_mask=token_mask,
            question_mask=question_mask,
            labels=labels[:, -seq:] if labels is not None and labels.dim() == 2 else None,
            routing_losses=[] if collect else None,
        )
        kwargs["routing"] = self.current
        return args, kwargs

    def _routable_ids(self, device: torch.device) -> torch.Tensor:
        if device not in self._ids:  # made once per device: a copy to the device per forward would wait for it
            self._ids[device] = torch.tensor(self.routable_ids, device=device)
        return self._ids[device]

    def after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        routing, self.current = self.current, None
        if routing is None or not routing.routing_losses:
            return output
        loss = torch.stack([value.float() for value in routing.routing_losses]).sum()
        routing.routing_losses = None  # consumed: layers replayed by gradient checkpointing add nothing more
        self.last_routing_loss = loss.detach()
        if getattr(output, "loss", None) is not None:
            output.loss = output.loss + loss.to(output.loss.dtype)
        return output


def real_tokens(
    mask: torch.Tensor | None, seq: int, cache: Any, device: torch.device
) -> tuple[torch.Tensor | None, int]:
    """The chunk's real (non-padding) tokens, bool [B, seq] (None: all real), and the mask's key length.

    From the tokenizer's 2-D mask [B, past + seq], or from the 4-D mask ``generate`` builds for a static cache
    [B, 1, seq, keys] (a token is real when it may attend to itself: its own column on the diagonal, at 0 in a
    static cache's prefill, at keys - seq otherwise). A one-token chunk under a 4-D mask is a decoded token: real.
    """
    if mask is None:
        return None, seq
    if mask.dim() == 2:
        return mask[:, -seq:].to(device=device, dtype=torch.bool), mask.shape[1]
    if mask.dim() != 4:
        raise ValueError(
            f"routed models take a 2-D padding attention_mask [batch, past + seq] (or generate's 4-D mask), got "
            f"{mask.dim()}-D; pass the tokenizer's attention_mask (1 = token, 0 = padding)."
        )
    if seq == 1:
        return None, mask.shape[-1]
    start = 0 if getattr(cache, "is_compileable", False) else mask.shape[-1] - seq
    own = torch.diagonal(mask[:, 0, :, start : start + seq], dim1=-2, dim2=-1)
    return (own if own.dtype == torch.bool else own == 0).to(device), mask.shape[-1]


#: The model attribute of a method that shortens the sequence before the decoder (VisionZip): an object whose
#: ``decoder_mask`` is the padding mask [B, T'] of the sequence the decoder got in the model's last forward or
#: generate (None: not shortened).
SHORTENING_ATTRIBUTE = "pmod_shortening"


def decoder_attention_mask(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """The padding mask of the sequence the decoder got in ``model``'s last call on ``attention_mask``: that mask,
    or the shortened one where the method shortened the sequence before the decoder (what the KV cache holds)."""
    shortened = getattr(getattr(model, SHORTENING_ATTRIBUTE, None), "decoder_mask", None)
    return attention_mask if shortened is None else shortened


def routing_loss(model: nn.Module) -> torch.Tensor | None:
    """The weighted routing loss of the model's last training forward (gamma-MoD), already added to its loss when
    labels were given; None when the method has none."""
    hook = getattr(model, "_routing_hook", None)
    return None if hook is None else hook.last_routing_loss


def load(path: str | Path, **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a model folder saved with ``save_pretrained``, routed or dense: the base class from ``config.json``;
    a routed folder's model converted with its stored method config, routers and all weights loaded by transformers'
    own ``from_pretrained``; a dense folder's model as ``from_pretrained`` loads it (``get_method_config`` is None;
    ``pmod.convert`` routes it). The one loader of every command that opens a model folder.

    Keyword arguments (``dtype``, ``device_map``, ``attn_implementation``, ...) go to ``from_pretrained``. Reads
    folders saved by pmod 0.1 (p-MoD settings under ``"pmod"``) too.

    A truncated or corrupt weight file raises :class:`UserError` naming it, before any weight is read. Settings that
    route no layer (e.g. an explicit schedule of only ``None``) load the dense model they describe, with a warning.
    """
    path = Path(path)
    check_complete(path)  # a final save that was interrupted: say so, not "no processor" or a missing weight
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; pass a folder written by save_pretrained.")
    check_weight_files(path)
    config = transformers.AutoConfig.from_pretrained(path)
    method_config = stored_method_config(config)
    archs = getattr(config, "architectures", None) or []
    base = getattr(transformers, archs[0], None) if archs else None
    adapter = backbone_for_model_type(getattr(config, "model_type", None))
    if base is None or adapter is None:
        raise UserError(
            f"{path} has architecture {archs} (model type {getattr(config, 'model_type', None)!r}); pmod supports "
            f"the model types {', '.join(supported_model_types())}."
        )
    if method_config is None:
        return base.from_pretrained(path, **from_pretrained_kwargs)

    def init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        _convert(self, method_config, adapter)

    # A subclass that converts itself on construction lets from_pretrained load the routers with every other
    # weight (including its own checkpoint key mappings); the class is switched back once loaded.
    loader = type(base.__name__, (base,), {"__init__": init, "__module__": base.__module__})
    model = loader.from_pretrained(path, **from_pretrained_kwargs)
    model.__class__ = base
    if not routed_layers(model) and method_config.routes_layers:
        logger.warning("%s", no_routed_layer_warning(path, method_config))
    return model


def no_routed_layer_warning(path: str | Path, method_config: MethodConfig) -> str:
    """The one line every command prints for a folder whose method settings leave every layer dense."""
    return (f"no layer of this model is routed ({path}: its {method_config.method} settings leave every "
            f"layer dense); it runs as the dense model.")  # fmt: skip


def record_routing(model: nn.Module) -> Any:
    """Record which tokens each routed layer processes, and its method's weights, for the forwards inside::

    with pmod.record_routing(model) as rec:
        model(**batch)
    rec.processed[8][0]  # bool [batch, seq] of layer 8, first forward
    """
    return recording.recording(
        routed_layers(model),
        lambda: ValueError("record_routing needs a routed model; convert it with pmod.convert(model) first."),
    )
