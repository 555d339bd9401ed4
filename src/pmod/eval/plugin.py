"""The entry point lmms-eval loads to find pmod's model: ``--model pmod`` (group ``lmms_eval.models`` in
pyproject.toml, read by ``lmms_eval/models/registry_v2.py``). Only lmms-eval imports this module."""

from __future__ import annotations

from typing import Any

#: The class lmms-eval instantiates for ``--model pmod``.
MODEL_CLASS = "pmod.eval.lmms_model.RoutedLMM"


def manifest() -> Any:
    """The :class:`lmms_eval.models.registry_v2.ModelManifest` of the ``pmod`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="pmod", simple_class_path=MODEL_CLASS)
