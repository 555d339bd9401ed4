"""Shapes of decoder-only language models for the analytic cost: dimensions read from configs, element sizes,
and the published LLaVA shapes as presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pmod.core.backbone import backbone_for_model_type

# Storage size of one KV-cache element.
BYTES_PER_ELEMENT: dict[str, int] = {
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float8": 1,
    "fp8": 1,
    "int8": 1,
}


def bytes_per_element(dtype: Any) -> int:
    """Bytes of one element of ``dtype``: a name from :data:`BYTES_PER_ELEMENT` or anything with ``.itemsize``
    (e.g. ``torch.float16``)."""
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in BYTES_PER_ELEMENT:
            raise ValueError(f"Unknown dtype {dtype!r}; use one of {sorted(BYTES_PER_ELEMENT)}.")
        return BYTES_PER_ELEMENT[key]
    itemsize = getattr(dtype, "itemsize", None)
    if not isinstance(itemsize, int):
        raise ValueError(f"Cannot tell the element size of dtype {dtype!r}; pass a name such as 'float16'.")
    return itemsize


@dataclass(frozen=True)
class LMDims:
    """The shape of a decoder-only language model with a gated MLP (Llama, Vicuna, Qwen2, Mistral)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LMDims.{f.name} must be a positive integer, got {value!r}.")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads}).")

    @classmethod
    def from_config(cls, config: Any) -> LMDims:
        """Read the dimensions from a transformers config or a ``config.json`` dict.

        Multimodal configs (LLaVA, LLaVA-NeXT) are read from their ``text_config``. A dict whose ``model_type``
        transformers knows is first built into that config class, so fields left at their defaults (LLaVA's
        ``text_config`` often lists only a few) get transformers' defaults; other dicts must name every field.
        """
        if isinstance(config, Mapping):
            config = _config_from_dict(config)
        if isinstance(config, Mapping):
            return cls._from_mapping(config)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        text = getattr(text, "text_config", None) or text
        return cls._from_mapping({k: getattr(text, k, None) for k in _CONFIG_KEYS})

    @classmethod
    def _from_mapping(cls, d: Mapping[str, Any]) -> LMDims:
        if isinstance(d.get("text_config"), Mapping):
            d = d["text_config"]
        missing = [k for k in _REQUIRED_KEYS if d.get(k) is None]
        if missing:
            raise ValueError(
                f"the config has no {', '.join(missing)}; pass a Llama/Qwen2/Mistral or LLaVA config that names "
                f"{', '.join(_REQUIRED_KEYS)}"
            )
        heads = int(d["num_attention_heads"])
        return cls(
            hidden=int(d["hidden_size"]),
            layers=int(d["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            intermediate=int(d["intermediate_size"]),
            vocab=int(d["vocab_size"]),
        )


_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
_CONFIG_KEYS = (*_REQUIRED_KEYS, "num_key_value_heads", "head_dim")


def _config_from_dict(d: Mapping[str, Any]) -> Any:
    """A transformers config built from ``d`` when its ``model_type`` is known, else ``d`` itself."""
    model_type = d.get("model_type")
    if not model_type:
        return d
    from transformers import AutoConfig  # lazy: transformers is slow to import

    kwargs = {k: v for k, v in d.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, KeyError):  # a model type transformers does not know (e.g. the original LLaVA repo's)
        return d


@dataclass(frozen=True)
class Preset:
    """A published model shape with its typical number of vision tokens per image."""

    name: str
    dims: LMDims
    n_vision: int
    description: str


def presets() -> dict[str, Preset]:
    """The published shapes of every registered backbone family (``pmod flops --preset``), by name."""
    from pmod.core.backbone import supported_model_types

    out: dict[str, Preset] = {}
    for model_type in supported_model_types():
        adapter = backbone_for_model_type(model_type)
        for name, (fields, n_vision, description) in adapter.flops_presets.items():
            out[name] = Preset(name, LMDims._from_mapping(fields), n_vision, description)
    return out


# Text tokens per sample when the caller does not say: a system prompt plus a short question.
DEFAULT_TEXT_TOKENS = 64




def vision_tokens(config: Mapping[str, Any]) -> tuple[int, str] | None:
    """Vision tokens one image gives a LLaVA model, from its own config (a ``config.json`` dict), and how that was
    worked out; None for a model without a vision config.

    LLaVA-1.5: the tower's patches, ``(image_size / patch_size) ** 2`` (plus the CLS token with the ``full`` select
    strategy). LLaVA-NeXT: the base view plus the largest anyres grid with its newline tokens (what the processor
    gives an image of that size).
    """
    cfg = _config_from_dict(config)
    vision = cfg.get("vision_config") if isinstance(cfg, Mapping) else getattr(cfg, "vision_config", None)
    if vision is None:
        return None

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)

    size, patch = get(vision, "image_size"), get(vision, "patch_size")
    if not size or not patch:
        return None
    side = int(size) // int(patch)
    strategy = get(cfg, "vision_feature_select_strategy") or "default"
    base = side * side + (1 if strategy == "full" else 0)
    pinpoints = get(cfg, "image_grid_pinpoints")
    if get(cfg, "model_type") == "llava_next" and pinpoints:
        h, w = max(pinpoints, key=lambda hw: hw[0] * hw[1])
        rows, cols = h // int(size) * side, w // int(size) * side
        return base + rows * cols + rows, f"a {h}x{w} px image: base view + largest anyres grid + newlines"
    return base, f"({size} / {patch})^2 patches of one image"


def weight_dtype(config: Mapping[str, Any]) -> str | None:
    """The dtype a ``config.json`` says the weights are stored in (``dtype``, or the older ``torch_dtype``)."""
    for obj in (config, config.get("text_config") or {}):
        value = obj.get("dtype") or obj.get("torch_dtype")
        if isinstance(value, str) and value in BYTES_PER_ELEMENT:
            return value
    return None
