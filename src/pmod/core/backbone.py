"""Backbone adapters: what ``convert`` needs to know about a model family, and the registry that finds it.

An adapter says where the decoder layers are, which token ids are routable, and which parameter prefixes belong to
the vision tower and the projector (for freezing and learning-rate groups). Families register themselves from
``pmod.backbones``; ``convert`` dispatches on the model's class name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pmod.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BackboneAdapter:
    """How pmod finds its way around one model family.

    Attributes:
        name: the family's name.
        model_classes: class names of the top-level models of this family.
        decoder: the module holding the decoder layers (its ``.layers``) of a model.
        routable_token_keys: config attributes holding the ids of routable tokens (image, video).
        vision_prefixes, projector_prefixes: module paths of the vision tower and the projector, as
            ``named_parameters`` spells them.
    """

    name: str
    model_classes: tuple[str, ...]
    decoder: Callable[[nn.Module], nn.Module]
    routable_token_keys: tuple[str, ...] = ()
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()

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
    # Wrappers (PEFT, DDP) put their own prefix in front: match a whole path component anywhere.
    dotted = f".{name}."
    return any(f".{prefix}." in dotted for prefix in prefixes)


class UnsupportedModelError(UserError, TypeError):
    """A model class no registered backbone adapter covers."""


_BACKBONES: dict[str, BackboneAdapter] = {}
#: The package whose modules register pmod's own families; imported on the first lookup (a plugin load by name, so
#: that core names no backbone and ``import pmod`` stays light).
BUILTIN_BACKBONES = "pmod.backbones"


def _registry() -> dict[str, BackboneAdapter]:
    importlib.import_module(BUILTIN_BACKBONES)
    return _BACKBONES


def register_backbone(adapter: BackboneAdapter) -> BackboneAdapter:
    """Make an adapter the one for each of its ``model_classes``."""
    for cls in adapter.model_classes:
        _BACKBONES[cls] = adapter
    return adapter


def supported_classes() -> list[str]:
    return list(_registry())


def find_backbone(model: nn.Module) -> BackboneAdapter | None:
    """The adapter of a model, by class name (also through subclasses), or None."""
    registry = _registry()
    for cls in type(model).__mro__:
        if cls.__name__ in registry:
            return registry[cls.__name__]
    return None


def backbone_for(model: nn.Module) -> BackboneAdapter:
    """The adapter of a model; an :class:`UnsupportedModelError` naming the supported classes otherwise."""
    adapter = find_backbone(model)
    if adapter is None:
        raise UnsupportedModelError(
            f"pmod does not support {type(model).__name__}. Supported model classes: "
            f"{', '.join(supported_classes())}. Load the model with one of them "
            f"(e.g. LlavaForConditionalGeneration.from_pretrained)."
        )
    return adapter


def backbone_for_class_name(name: str) -> BackboneAdapter | None:
    return _registry().get(name)
