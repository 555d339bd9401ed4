"""Analytic FLOPs and KV-cache bytes of a decoder-only language model, dense vs p-MoD.

Conventions (they match what runs, and what ``torch.utils.flop_counter.FlopCounterMode`` reports):

* A matmul ``[M, K] @ [K, N]`` costs ``2 * M * N * K`` FLOPs (one multiply + one add per term). Elementwise work
  (norms, rotary, softmax, SiLU, residual adds, bias adds, TanhNorm/STRing scaling) and gathers/scatters count 0.
* Attention runs over the ``K`` tokens a layer processes. QK^T and AV are counted over the **full** ``[K x K]`` score
  matrix, as sdpa/eager execute them (the causal mask does not skip work): ``2 * K * K * head_dim * num_heads`` each.
  Query heads count here, not KV heads (GQA broadcasts K/V to every query head).
* Projections: q and o use ``num_heads * head_dim``; k and v use ``num_key_value_heads * head_dim`` (GQA).
  The MLP is gated (Llama/Qwen2/Mistral SwiGLU): gate, up and down, ``3 * 2 * K * hidden * intermediate``.
* A p-MoD layer with ratio ``R`` processes ``n_text + floor(R * n_vision)`` tokens per sample; its router
  ``Linear(hidden, 1)`` scores every token of the layer input (``2 * T * hidden``). Dense layers have no router.
* The LM head runs on **all** prefill tokens (``2 * T * hidden * vocab``), as a plain ``model(...)`` forward or a
  training step does. ``generate()`` only computes the last position's logits during prefill; use the
  ``*_without_lm_head`` numbers for that case (the head is the same for dense and p-MoD either way).
  Headline totals include the head by default (the paper counts the LLM's prefill FLOPs).
* Decode: one step after prefill, one new (text) token per sample, processed by every layer, attending to the layer's
  cached tokens plus itself; the router scores it in p-MoD layers; the LM head runs on it.
* KV cache: each layer caches K and V of its processed tokens only:
  ``2 * B * K_l * num_key_value_heads * head_dim * bytes_per_element``.
* Every sample has the same ``n_vision`` and ``n_text`` (no padding). With padded batches the executed ``K`` is the
  maximum over rows, so real batches can cost a little more than this estimate.
* Not counted: rotary-frequency setup and the vision tower/projector (this is the language model only).

Versus the paper (LLaVA-NeXT-7B, "55.6% TFLOPs, 53.8% KV cache"): for 2880 vision + 64 text tokens this module gives
54.1% TFLOPs (53.3% without the LM head) and 54.7% KV cache. The KV figure of the paper equals the mean vision
retention of the PRD schedule, 0.5375, i.e. the share of *vision* KV kept; text tokens, which every layer keeps,
pull our ratio up (with 0 text tokens it is 53.7%). The TFLOPs gap is the workload: the paper averages over benchmark
samples, where LLaVA-NeXT's AnyRes images usually give fewer than 2880 vision tokens and prompts are longer, and
a larger text share raises the ratio (576 vision + 64 text gives 58.8%); the exact prompt lengths are not published.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pmod.config import PModConfig
from pmod.schedule import kept_count

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


def pmod_config_from(config: Any) -> PModConfig | None:
    """The p-MoD settings stored in a model config (key ``pmod``, top level or in ``text_config``), if any."""

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)

    for obj in (config, get(config, "text_config")):
        value = get(obj, "pmod") if obj is not None else None
        if isinstance(value, PModConfig):
            return value
        if isinstance(value, Mapping):
            return PModConfig.from_dict(dict(value))
    return None


@dataclass(frozen=True)
class Preset:
    """A published model shape with its typical number of vision tokens per image."""

    name: str
    dims: LMDims
    n_vision: int
    description: str


_VICUNA_7B = LMDims(hidden=4096, layers=32, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000)
_VICUNA_13B = LMDims(hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, intermediate=13824, vocab=32000)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("llava-1.5-7b", _VICUNA_7B, 576, "LLaVA-1.5 on Vicuna-7B, 576 vision tokens (336px, 24x24 patches)"),
        Preset("llava-next-7b", _VICUNA_7B, 2880, "LLaVA-NeXT on Vicuna-7B, up to 2880 vision tokens (AnyRes, 5x576)"),
        Preset("llava-1.5-13b", _VICUNA_13B, 576, "LLaVA-1.5 on Vicuna-13B, 576 vision tokens"),
        Preset("llava-next-13b", _VICUNA_13B, 2880, "LLaVA-NeXT on Vicuna-13B, up to 2880 vision tokens"),
    )
}

# Text tokens per sample when the caller does not say: a system prompt plus a short question.
DEFAULT_TEXT_TOKENS = 64


@dataclass(frozen=True)
class LayerCost:
    """FLOPs and KV bytes of one decoder layer, summed over the batch.

    Attributes:
        index: layer number.
        ratio: retention ratio, None for a dense layer.
        kept_vision: vision tokens the layer processes per sample.
        processed: tokens the layer processes (and caches) per sample: text + ``kept_vision``.
        attn_proj, attn_scores, attn_values, mlp, router: prefill FLOPs of q/k/v/o, QK^T, AV, the MLP, the router.
        kv_bytes: the layer's KV cache after prefill.
        decode: FLOPs of the layer for one decoding step (one new token per sample).
    """

    index: int
    ratio: float | None
    kept_vision: int
    processed: int
    attn_proj: int
    attn_scores: int
    attn_values: int
    mlp: int
    router: int
    kv_bytes: int
    decode: int

    @property
    def flops(self) -> int:
        """Prefill FLOPs of the layer."""
        return self.attn_proj + self.attn_scores + self.attn_values + self.mlp + self.router

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops": self.flops}


def layer_cost(
    dims: LMDims, index: int, ratio: float | None, n_vision: int, n_text: int, batch_size: int, elem_bytes: int
) -> LayerCost:
    """Cost of decoder layer ``index`` with retention ``ratio`` (None = dense) for the given token counts."""
    kept = kept_count(n_vision, ratio)
    k = n_text + kept  # tokens processed per sample
    t = n_text + n_vision  # tokens entering the layer per sample
    b, h, hd = batch_size, dims.hidden, dims.head_dim
    proj_width = 2 * dims.heads * hd + 2 * dims.kv_heads * hd  # q + o, k + v
    proj_per_token = 2 * h * proj_width
    mlp_per_token = 3 * 2 * h * dims.intermediate
    router_per_token = 2 * h if ratio is not None else 0
    # One AV or QK^T for a query against `n` keys: 2 * n * head_dim per head.
    decode_attn = 2 * (2 * dims.heads * hd * (k + 1))
    return LayerCost(
        index=index,
        ratio=ratio,
        kept_vision=kept,
        processed=k,
        attn_proj=b * k * proj_per_token,
        attn_scores=b * 2 * dims.heads * k * k * hd,
        attn_values=b * 2 * dims.heads * k * k * hd,
        mlp=b * k * mlp_per_token,
        router=b * t * router_per_token,
        kv_bytes=2 * b * k * dims.kv_heads * hd * elem_bytes,
        decode=b * (proj_per_token + mlp_per_token + router_per_token + decode_attn),
    )


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@dataclass(frozen=True)
class FlopsReport:
    """Dense vs p-MoD cost of one prefill (and one decoding step) of the language model.

    All FLOPs and bytes are totals over the batch. ``include_lm_head`` says whether the headline totals
    (:attr:`dense_flops`, :attr:`pmod_flops`, :attr:`tflops_ratio`) include the LM head.
    """

    dims: LMDims
    pmod_config: PModConfig
    n_vision: int
    n_text: int
    batch_size: int
    bytes_per_element: int
    dense_layers: list[LayerCost]
    pmod_layers: list[LayerCost]
    lm_head_flops: int
    lm_head_decode_flops: int
    include_lm_head: bool = True
    schedule: list[float | None] = field(default_factory=list)

    @property
    def dense_layers_flops(self) -> int:
        return sum(c.flops for c in self.dense_layers)

    @property
    def pmod_layers_flops(self) -> int:
        return sum(c.flops for c in self.pmod_layers)

    @property
    def dense_flops(self) -> int:
        return self.dense_layers_flops + (self.lm_head_flops if self.include_lm_head else 0)

    @property
    def pmod_flops(self) -> int:
        return self.pmod_layers_flops + (self.lm_head_flops if self.include_lm_head else 0)

    @property
    def tflops_ratio(self) -> float:
        return _ratio(self.pmod_flops, self.dense_flops)

    @property
    def dense_decode_flops(self) -> int:
        return sum(c.decode for c in self.dense_layers) + (self.lm_head_decode_flops if self.include_lm_head else 0)

    @property
    def pmod_decode_flops(self) -> int:
        return sum(c.decode for c in self.pmod_layers) + (self.lm_head_decode_flops if self.include_lm_head else 0)

    @property
    def dense_kv_bytes(self) -> int:
        return sum(c.kv_bytes for c in self.dense_layers)

    @property
    def pmod_kv_bytes(self) -> int:
        return sum(c.kv_bytes for c in self.pmod_layers)

    @property
    def kv_cache_ratio(self) -> float:
        return _ratio(self.pmod_kv_bytes, self.dense_kv_bytes)

    @property
    def mean_retention(self) -> float:
        """Mean share of vision tokens the layers process (dense layers count 1)."""
        # fsum: the PRD values sum to a round number (0.5375 for 32 layers) that plain sum misses by an ulp.
        return math.fsum(1.0 if r is None else r for r in self.schedule) / len(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; ``layers`` holds the p-MoD per-layer records, ``dense_layers`` the dense ones."""
        return {
            "dense_tflops": self.dense_flops / 1e12,
            "pmod_tflops": self.pmod_flops / 1e12,
            "tflops_ratio": self.tflops_ratio,
            "dense_kv_bytes": self.dense_kv_bytes,
            "pmod_kv_bytes": self.pmod_kv_bytes,
            "kv_cache_ratio": self.kv_cache_ratio,
            "mean_retention": self.mean_retention,
            "includes_lm_head": self.include_lm_head,
            "dense_flops": self.dense_flops,
            "pmod_flops": self.pmod_flops,
            "lm_head_flops": self.lm_head_flops,
            "dense_flops_without_lm_head": self.dense_layers_flops,
            "pmod_flops_without_lm_head": self.pmod_layers_flops,
            "tflops_ratio_without_lm_head": _ratio(self.pmod_layers_flops, self.dense_layers_flops),
            "dense_decode_flops": self.dense_decode_flops,
            "pmod_decode_flops": self.pmod_decode_flops,
            "decode_flops_ratio": _ratio(self.pmod_decode_flops, self.dense_decode_flops),
            "lm_head_decode_flops": self.lm_head_decode_flops,
            "n_vision": self.n_vision,
            "n_text": self.n_text,
            "batch_size": self.batch_size,
            "bytes_per_element": self.bytes_per_element,
            "dims": dataclasses.asdict(self.dims),
            "pmod": self.pmod_config.to_dict(),
            "schedule": list(self.schedule),
            "layers": [c.to_dict() for c in self.pmod_layers],
            "dense_layers": [c.to_dict() for c in self.dense_layers],
        }


def estimate(
    config_or_dims: LMDims | Mapping[str, Any] | Any,
    pmod_config: PModConfig | None = None,
    *,
    n_vision: int,
    n_text: int = DEFAULT_TEXT_TOKENS,
    batch_size: int = 1,
    dtype: Any = "float16",
    include_lm_head: bool = True,
) -> FlopsReport:
    """Analytic prefill/decode FLOPs and KV-cache bytes of the language model, dense and p-MoD.

    Args:
        config_or_dims: :class:`LMDims`, a transformers config (LLaVA configs are read from ``text_config``) or a
            ``config.json`` dict.
        pmod_config: the p-MoD settings; None takes the config's ``pmod`` entry, else the paper's defaults.
        n_vision, n_text: vision (routable) and text tokens per sample.
        batch_size: samples, all with these token counts.
        dtype: KV-cache element type, a name (``"float16"``) or a ``torch.dtype``.
        include_lm_head: whether the headline totals include the LM head (run on every prefill token).
    """
    if n_vision < 0 or n_text < 0 or n_vision + n_text == 0:
        raise ValueError(f"Token counts must be >= 0 and not both 0, got n_vision={n_vision}, n_text={n_text}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(config_or_dims, LMDims):
        dims = config_or_dims
    else:
        dims = LMDims.from_config(config_or_dims)
        if pmod_config is None:
            pmod_config = pmod_config_from(config_or_dims)
    pmod_config = pmod_config or PModConfig()
    schedule = pmod_config.layer_ratios(dims.layers)
    elem = bytes_per_element(dtype)
    args = (n_vision, n_text, batch_size, elem)
    t = n_vision + n_text
    return FlopsReport(
        dims=dims,
        pmod_config=pmod_config,
        n_vision=n_vision,
        n_text=n_text,
        batch_size=batch_size,
        bytes_per_element=elem,
        dense_layers=[layer_cost(dims, i, None, *args) for i in range(dims.layers)],
        pmod_layers=[layer_cost(dims, i, r, *args) for i, r in enumerate(schedule)],
        lm_head_flops=2 * batch_size * t * dims.hidden * dims.vocab,
        lm_head_decode_flops=2 * batch_size * dims.hidden * dims.vocab,
        include_lm_head=include_lm_head,
        schedule=schedule,
    )


def flop_counter(display: bool = False) -> Any:
    """A ``torch.utils.flop_counter.FlopCounterMode`` that also counts CPU sdpa.

    On CPU, sdpa dispatches to ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter does not
    know (it would count 0); it is mapped to the same formula as the GPU kernels.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_sdpa_flop(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes here, not tensors

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = cpu_sdpa_flop
    return FlopCounterMode(display=display, custom_mapping=mapping)
