"""What an original LLaVA / p-MoD ``config.json`` (the LLaVA code base on transformers 4.37, and the p-MoD authors'
fork of it) means, as pmod and Hugging Face settings.

Everything a config may say that the Hugging Face LLaVA classes or pmod cannot run the same way is refused here,
before a byte is written, with the key and what pmod expected. Reading a config imports no torch (only a p-MoD
schedule's exact ratios need it), so ``pmod import-llava`` answers a wrong source at once.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmod.core.errors import UserError
from pmod.core.schedules import FIRST_ROUTABLE_LAYER
from pmod.methods.pmod import PModConfig

PLAIN, PMOD = "llava_llama", "pmod_llava_llama"

#: Llama fields of the original config that the Hugging Face text config takes over.
LLAMA_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
    "attention_dropout", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "initializer_range", "vocab_size",
)  # fmt: skip

#: The original p-MoD code's decay schedules: the layer count is written as 31 whatever the model's depth.
DECAYS = {
    "shiftedcos": lambda factor, layer: math.cos(layer * math.pi / 31) / 2 + factor,
    "shiftedlinear": lambda factor, layer: (-layer / 31 + 0.5) + factor,
}
#: Named layer sets of the original code (constant ratio ``mod_router_factor``).
LAYER_SETS = {
    "deep_all": lambda n: range(2, n - 1),
    "deep_all_include_last": lambda n: range(2, n),
    "interleave": lambda n: range(1, n, 2),
}
NORMS = ("tanh", "sigmoid", "none")


@dataclass(frozen=True)
class OriginalLlava:
    """The settings of an original checkpoint, checked."""

    model_type: str
    text: dict[str, Any]  # Llama fields for transformers' LlamaConfig
    anyres: bool  # LLaVA-NeXT (anyres tiles, spatial_unpad, image_newline) rather than LLaVA-1.5
    pad_to_square: bool  # image_aspect_ratio "pad": images padded to a square with the mean colour first
    grid_pinpoints: list[list[int]] | None  # (height, width) pairs, as Hugging Face reads them
    vision_tower: str  # mm_vision_tower: a hub name or a path
    vision_feature_layer: int
    vision_feature_select_strategy: str  # "default" (CLS dropped) or "full"
    mm_hidden_size: int | None
    pmod: PModConfig | None
    original: dict[str, Any]  # the multimodal and p-MoD keys as the source wrote them (kept for the record)


def _bad(key: str, value: Any, expected: str) -> UserError:
    return UserError(f"config.json has {key}={value!r}, which pmod cannot import faithfully; it reads {expected}.")


def original_ratios(spec: str, factor: float, num_layers: int) -> list[float | None]:
    """The per-layer ratios the original p-MoD code runs for ``mod_target_layers=spec`` (None = dense layer).

    ``{shiftedcos,shiftedlinear}_decay_MAX_MIN``: layer l is routed when ``decay(factor, l) <= MAX``, with ratio
    ``max(decay(factor, l), MIN)``; ``decay`` divides by 31 whatever the depth (so a 40-layer model's cosine comes
    back up after layer 31). ``deep_all``, ``deep_all_include_last`` and ``interleave`` route a fixed layer set at
    ``factor``.
    """
    match = re.fullmatch(r"(\w+?)_decay_(\d+\.\d+)_(\d+\.\d+)", spec)
    if match:
        kind, max_ratio, min_ratio = match[1], float(match[2]), float(match[3])
        if kind not in DECAYS:
            raise _bad("mod_target_layers", spec, f"a decay of {' or '.join(DECAYS)} (e.g. shiftedcos_decay_0.85_0.15)")
        raw = [DECAYS[kind](factor, layer) for layer in range(num_layers)]
        return [max(r, min_ratio) if r <= max_ratio else None for r in raw]
    if spec in LAYER_SETS:
        chosen = set(LAYER_SETS[spec](num_layers))
        return [factor if i in chosen else None for i in range(num_layers)]
    raise _bad(
        "mod_target_layers",
        spec,
        "shiftedcos_decay_MAX_MIN, shiftedlinear_decay_MAX_MIN, deep_all, deep_all_include_last or interleave",
    )


def count_exact(ratio: float, max_tokens: int) -> float:
    """The ratio whose ``floor(n * ratio)`` in float64 (how pmod counts kept tokens) equals what the original code
    keeps, ``trunc(n * ratio)`` of an int32 count in float32, for every ``n <= max_tokens``.

    The two differ by one token at some counts (e.g. 2365 vision tokens at the 32-layer schedule's layer 10). The
    ratios that reproduce every count form an interval near ``ratio`` (its lower end a few 1e-8 away).
    """
    import torch

    from pmod.core.compaction import kept_counts

    n = torch.arange(1, max_tokens + 1, dtype=torch.int32)
    want = torch.trunc(n * ratio).long()  # int32 tensor times a Python float: float32, as in the original

    def exact(r: float) -> bool:
        return bool((kept_counts(n, r) == want).all())

    if exact(ratio):
        return ratio
    candidate = float((want / n.double()).max())  # the interval's lower end, rounded to float64
    for _ in range(8):  # ... which may sit a few ulps below the interval
        if exact(candidate):
            return candidate
        candidate = math.nextafter(candidate, math.inf)
    return ratio  # no float64 ratio reproduces every count (not seen for any schedule): keep the original's


def weight_norm(spec: Any) -> tuple[str, float, float]:
    """``mod_weight_norm`` as (activation, scale, bias) of ``w~ = scale * act(logit) + bias``.

    ``NAME_SCALE_BIAS`` (e.g. ``tanh_0.2_1``), or a bare name, which the original code runs with scale 1 and bias 1.
    """
    text = str(spec)
    match = re.fullmatch(r"([a-z]+)_(\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?)", text)
    name, scale, bias = (match[1], float(match[2]), float(match[3])) if match else (text, 1.0, 1.0)
    if spec is None or name not in NORMS:
        why = " (a softmax over the sequence, which pmod's routers do not compute)" if name == "softmax" else ""
        raise _bad("mod_weight_norm", spec, f"NAME_SCALE_BIAS or NAME with NAME one of {', '.join(NORMS)}{why}")
    if scale <= 0:
        # The original ranks tokens by the weight; pmod by the logit: the same order only when scale > 0.
        raise _bad("mod_weight_norm", spec, "a positive scale (the tokens are ranked by their weight)")
    return name, scale, bias


def pmod_config(cfg: dict[str, Any], num_layers: int) -> PModConfig:
    """The :class:`PModConfig` that computes what the original p-MoD code computes for this config: explicit
    per-layer ratios (that keep the original's token counts for every prompt that fits the context), its weight norm,
    STRing always on (the original scales every skipped vision token)."""
    factor = cfg.get("mod_router_factor", 0.5)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise _bad("mod_router_factor", factor, "a number")
    spec = cfg.get("mod_target_layers")
    if not isinstance(spec, str):
        raise _bad("mod_target_layers", spec, "a layer schedule such as shiftedcos_decay_0.85_0.15")
    token_type = cfg.get("mod_target_token_type", "vision_all")
    if token_type not in (None, "vision_all"):
        raise _bad("mod_target_token_type", token_type, "vision_all (pmod routes every image token)")
    bias = cfg.get("mod_bias_enabled", False)
    if not isinstance(bias, bool):
        raise _bad("mod_bias_enabled", bias, "true or false")
    ratios = original_ratios(spec, float(factor), num_layers)
    if any(r is not None for r in ratios[:FIRST_ROUTABLE_LAYER]):
        raise _bad(
            "mod_target_layers",
            spec,
            "schedules that keep layer 0 dense (transformers sizes its masks and positions from layer 0's cache)",
        )
    for i, r in enumerate(ratios):
        if r is not None and not 0 < r <= 1:
            raise _bad("mod_target_layers", spec, f"ratios in (0, 1]; layer {i} would keep {r:.4g} of the tokens")
    norm, scale, norm_bias = weight_norm(cfg.get("mod_weight_norm"))
    context = int(cfg.get("max_position_embeddings") or 4096)
    return PModConfig(
        schedule="explicit",
        ratios=[None if r is None else count_exact(r, context) for r in ratios],
        weight_norm=norm,
        weight_scale=scale,
        weight_bias=norm_bias,
        string=True,
        router_bias=bias,
    )


def _pinpoints(value: Any) -> list[list[int]]:
    points = ast.literal_eval(value) if isinstance(value, str) else value
    try:
        # The original reads each pair as (width, height); Hugging Face as (height, width).
        return [[int(h), int(w)] for w, h in points]
    except (TypeError, ValueError) as err:
        raise _bad("image_grid_pinpoints", value, "a list of [width, height] pairs") from err


def read_original(cfg: dict[str, Any]) -> OriginalLlava:
    """Check an original ``config.json`` (as a dict) and return its settings; raise :class:`UserError` naming the
    key for anything pmod cannot import faithfully."""
    model_type = cfg.get("model_type")
    if model_type not in (PLAIN, PMOD):
        raise _bad("model_type", model_type, f"{PLAIN} (LLaVA) or {PMOD} (p-MoD) checkpoints of the LLaVA code base")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise UserError(f"config.json lacks {', '.join(missing)}; pass the folder of a complete LLaVA checkpoint.")
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise _bad(
            "mm_projector_type",
            cfg.get("mm_projector_type", "linear"),
            "mlp2x_gelu (the only projector the Hugging Face LLaVA classes have)",
        )
    if cfg.get("mm_use_im_start_end"):
        raise _bad("mm_use_im_start_end", True, "false (Hugging Face LLaVA has no image start/end tokens)")
    if cfg.get("max_num_patches") is not None:
        raise _bad("max_num_patches", cfg["max_num_patches"], "null (tiles are not interpolated down)")
    select = {"patch": "default", "cls_patch": "full"}.get(cfg.get("mm_vision_select_feature", "patch"))
    if select is None:
        raise _bad("mm_vision_select_feature", cfg["mm_vision_select_feature"], "patch or cls_patch")
    layer = cfg.get("mm_vision_select_layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise _bad("mm_vision_select_layer", layer, "a layer index such as -2")
    tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not isinstance(tower, str):
        raise _bad("mm_vision_tower", tower, "the name or path of a CLIP vision tower")
    aspect = cfg.get("image_aspect_ratio", "square")
    merge = cfg.get("mm_patch_merge_type", "flat")
    if aspect == "anyres":
        if merge != "spatial_unpad":
            raise _bad("mm_patch_merge_type", merge, "spatial_unpad for anyres models (Hugging Face LLaVA-NeXT)")
        if not cfg.get("image_grid_pinpoints"):
            raise _bad("image_grid_pinpoints", cfg.get("image_grid_pinpoints"), "the anyres resolutions")
    elif aspect not in ("pad", "square", None):
        raise _bad("image_aspect_ratio", aspect, "pad, square or anyres")
    # Without anyres the original encodes each image as one batch entry: no merge, so mm_patch_merge_type is unused.
    anyres = aspect == "anyres"
    text = {k: cfg[k] for k in LLAMA_KEYS if cfg.get(k) is not None}
    num_layers = int(cfg["num_hidden_layers"])
    if model_type == PMOD and not cfg.get("mod_target_layers"):
        raise _bad("mod_target_layers", cfg.get("mod_target_layers"), "the p-MoD layer schedule")
    return OriginalLlava(
        model_type=model_type,
        text=text,
        anyres=anyres,
        pad_to_square=aspect == "pad",
        grid_pinpoints=_pinpoints(cfg["image_grid_pinpoints"]) if anyres else None,
        vision_tower=tower,
        vision_feature_layer=layer,
        vision_feature_select_strategy=select,
        mm_hidden_size=cfg.get("mm_hidden_size"),
        pmod=pmod_config(cfg, num_layers) if model_type == PMOD else None,
        original={k: cfg[k] for k in sorted(cfg) if k.startswith(("mm_", "mod_", "image_")) or k == "model_type"},
    )


def read_source(src: str | Path) -> OriginalLlava:
    """The checked settings of the original checkpoint folder ``src`` (its ``config.json``); a :class:`UserError`
    for a folder without one, a config that is not JSON, or settings pmod cannot import."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise UserError(f"{src} has no config.json; pass the folder of an original LLaVA or p-MoD checkpoint.")
    try:
        return read_original(json.loads((src / "config.json").read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{src}/config.json is not valid JSON ({err}); re-download it.") from err
