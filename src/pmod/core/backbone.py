"""Backbone adapters: what ``convert`` needs to know about a model family, and the registry that finds it.

An adapter says where the decoder layers are, which token ids are routable, and which parameter prefixes belong to
the vision tower and the projector (for freezing and learning-rate groups). Families register themselves from
``pmod.backbones``; ``convert`` dispatches on the config's ``model_type``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pmod.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class VisionTokenPath:
    """Where one family's per-image vision tokens pass from its tower to its projector, for a method that reduces them
    before the decoder (VisionZip).

    Attributes:
        encoder_layers: the tower's encoder layers.
        feature_layer: the index into the tower's hidden states whose tokens feed the projector (LLaVA's
            ``vision_feature_layer``: -2); hidden state ``i`` is the output of encoder layer ``i - 1``.
        projector: the module that maps the selected tokens [images, tokens, width] to the decoder's width.
        image_token_id: the placeholder id standing for one vision token in ``input_ids``.
        tokens_per_image: the placeholders the processor writes for one image (one view; :attr:`views` for more).
        has_cls: the tower's first token is a [CLS] token that attends to every patch.
        views: for families that tile an image into several views (LLaVA-NeXT's anyres): ``image_sizes -> [(views,
            placeholders, tile rows, tile cols)]`` of each image of a call; None: one view per image.
        packer: the module whose ``pack_image_features`` lays an image's views out for the decoder (LLaVA-NeXT's
            base model), for a method that lays out reduced views its own way.
    """

    encoder_layers: nn.ModuleList
    feature_layer: int
    projector: nn.Module
    image_token_id: int
    tokens_per_image: int
    has_cls: bool = True
    views: Callable[[Any], list[tuple[int, int, int, int]]] | None = None
    packer: nn.Module | None = None


@dataclass(frozen=True)
class BackboneAdapter:
    """How pmod finds its way around one model family.

    Attributes:
        name: the family's name.
        model_types: the ``config.model_type`` values of this family (dispatch is on them).
        decoder: the module holding the decoder layers (its ``.layers``) of a model, with or without its head.
        routable_token_keys: config attributes holding the ids of routable tokens (image, video).
        vision_prefixes, projector_prefixes: module names of the vision tower and the projector; a parameter
            belongs to them when one of these stands as a whole path component in its name.
        image_grid: ``(model, processor inputs) -> (rows, cols)`` of the first image's tokens, in the order they
            stand in the sequence (row by row), for the plots; None where the family has no images.
        flops_presets: published shapes of this family for ``pmod flops --preset`` (name -> (model dims
            as config fields, vision tokens, description)).
        vision_token_path: ``model -> VisionTokenPath`` for methods that act on the vision tokens before the decoder;
            None where the family has no such path that pmod supports (those methods refuse it in one line).
    """

    name: str
    model_types: tuple[str, ...]
    decoder: Callable[[nn.Module], nn.Module]
    routable_token_keys: tuple[str, ...] = ()
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()
    image_grid: Callable[[nn.Module, dict], tuple[int, int] | None] | None = None
    flops_presets: dict[str, tuple[dict[str, int], int, str]] = field(default_factory=dict)
    vision_token_path: Callable[[nn.Module], VisionTokenPath] | None = None

    @property
    def multimodal(self) -> bool:
        """Whether the family takes images (and so runs under ``pmod generate`` / ``pmod viz``)."""
        return bool(self.routable_token_keys)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def routable_token_ids(self, config: object) -> list[int]:
        ids = [getattr(config, key, None) for key in self.routable_token_keys]
        return [int(i) for i in ids if i is not None]

    def is_vision_parameter(self, name: str) -> bool:
        return _under(name, self.vision_prefixes)

    def is_projector_parameter(self, name: str) -> bool:
        return _under(name, self.projector_prefixes)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    # Wrappers (PEFT, DDP) and heads put their own prefix in front: match whole path components anywhere.
    dotted = f".{name}."
    return any(f".{prefix}." in dotted for prefix in prefixes)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder of a multimodal model with a head (``model.model.language_model``) or without one."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def text_decoder(model: nn.Module) -> nn.Module:
    """The decoder of a text model with a head (``model.model``) or without one (the model itself)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "layers") else model


class UnsupportedModelError(UserError, TypeError):
    """A model no registered backbone adapter covers."""


_BACKBONES: dict[str, BackboneAdapter] = {}
#: The package whose modules register pmod's own families; imported on the first lookup (a plugin load by name, so
#: that core names no backbone and ``import pmod`` stays light).
BUILTIN_BACKBONES = "pmod.backbones"


def _registry() -> dict[str, BackboneAdapter]:
    importlib.import_module(BUILTIN_BACKBONES)
    return _BACKBONES


def register_backbone(adapter: BackboneAdapter) -> BackboneAdapter:
    """Make an adapter the one for each of its ``model_types``."""
    for model_type in adapter.model_types:
        _BACKBONES[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return list(_registry())


def backbone_for_model_type(model_type: str | None) -> BackboneAdapter | None:
    return _registry().get(model_type or "")


def find_backbone(model: nn.Module) -> BackboneAdapter | None:
    """The adapter of a model, by its config's ``model_type``, or None."""
    config = getattr(model, "config", None)
    return backbone_for_model_type(getattr(config, "model_type", None))


def backbone_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of a model; an :class:`UnsupportedModelError` naming the supported families otherwise."""
    adapter = find_backbone(model)
    if adapter is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"pmod does not support {type(model).__name__} (model type {kind!r}). Supported model types: "
            f"{', '.join(supported_model_types())}. Load a LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen-VL or "
            f"Llama-family model (e.g. LlavaForConditionalGeneration.from_pretrained)."
        )
    return adapter
