"""Analytic FLOPs and KV-cache bytes of a decoder-only language model, dense vs a routing method (p-MoD, MoD,
gamma-MoD, FastV, PyramidDrop, DART, VisionZip). What each layer computes comes from the method config's ``layer_plan``.

Conventions (they match what runs, and what ``torch.utils.flop_counter.FlopCounterMode`` reports):

* A matmul ``[M, K] @ [K, N]`` costs ``2 * M * N * K`` FLOPs (one multiply + one add per term). Elementwise work
  (norms, rotary, softmax, SiLU, residual adds, bias adds, TanhNorm/STRing scaling) and gathers/scatters count 0.
* Attention runs over the ``K`` tokens a layer processes. QK^T and AV are counted over the **full** ``[K x K]`` score
  matrix, as sdpa/eager execute them (the causal mask does not skip work): ``2 * K * K * head_dim * num_heads`` each.
  Query heads count here, not KV heads (GQA broadcasts K/V to every query head).
* Projections: q and o use ``num_heads * head_dim``; k and v use ``num_key_value_heads * head_dim`` (GQA).
  The MLP is gated (Llama/Qwen2/Mistral SwiGLU): gate, up and down, ``3 * 2 * K * hidden * intermediate``.
* A routed layer with ratio ``R`` processes ``n_text + floor(R * n_vision)`` tokens per sample (p-MoD, MoD;
  FastV rounds to the nearest integer); its router ``Linear(hidden, r)`` scores every token of the layer input
  (``2 * T * hidden * r``: r = 1 for p-MoD/MoD, 2 for gamma-MoD's shared router, 0 for FastV). gamma-MoD routes the
  text outside the question too: ``n_question`` text tokens are always processed, the rest of the text and the
  vision tokens are routable (default: every text token is a question token, as at inference without a
  ``question_mask``). FastV's layer K-1 also computes its last token's attention row: a key projection over the
  sequence, one query projection and one score row (``2 T hidden kv_width + 2 hidden q_width + 2 heads T head_dim``);
  PyramidDrop's boundaries compute the same row. DART's layer K-1 projects the sequence to keys once more
  (``2 T hidden kv_width``) and its layer K compares its P pivots with every token (``2 P T hidden``).
  VisionZip shortens the sequence before the decoder: every layer, the KV cache and the LM head see
  ``n_text + (dominant + contextual) * views`` tokens, ``views = ceil(n_vision / 576)`` (one per LLaVA-1.5 image,
  five in LLaVA-NeXT's 2880; approximate for NeXT's unpadded tiles), at most ``n_text + n_vision``; its work in
  the tower is not counted.
  Dense layers have no router.
* The LM head runs on **all** prefill tokens (``2 * T * hidden * vocab``), as a plain ``model(...)`` forward or a
  training step does. ``generate()`` only computes the last position's logits during prefill; use the
  ``*_without_lm_head`` numbers for that case (the head is the same for dense and p-MoD either way).
  Headline totals include the head by default (the paper counts the LLM's prefill FLOPs).
* Decode: one step after prefill, one new (text) token per sample, processed by every layer, attending to the layer's
  cached tokens plus itself; the router scores it in routed layers; the LM head runs on it (gamma-MoD may skip it
  in a layer: this counts the upper bound).
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

from pmod.analysis.dims import (
    BYTES_PER_ELEMENT,
    DEFAULT_TEXT_TOKENS,
    LMDims,
    Preset,
    bytes_per_element,
    presets,
)
from pmod.core.config import DEFAULT_METHOD, LayerPlan, MethodConfig, method_class, stored_method_config
from pmod.core.schedules import kept_count

__all__ = [
    "BYTES_PER_ELEMENT",
    "DEFAULT_TEXT_TOKENS",
    "presets",
    "FlopsReport",
    "LMDims",
    "LayerCost",
    "Preset",
    "bytes_per_element",
    "estimate",
    "flop_counter",
    "layer_cost",
    "method_config_from",
]

def method_config_from(config: Any) -> MethodConfig | None:
    """The method settings stored in a model config (``pmod_method``, or pmod 0.1's ``pmod``; top level or in
    ``text_config``), if any."""

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)

    for obj in (config, get(config, "text_config")):
        if obj is None:
            continue
        stored = stored_method_config(dict(obj) if isinstance(obj, Mapping) else obj)
        if stored is not None:
            return stored
    return None


@dataclass(frozen=True)
class LayerCost:
    """FLOPs and KV bytes of one decoder layer, summed over the batch.

    Attributes:
        index: layer number.
        ratio: retention ratio, None for a dense layer.
        kept_vision: vision tokens the layer processes per sample.
        processed: tokens the layer processes (and caches) per sample: text + ``kept_vision``.
        attn_proj, attn_scores, attn_values, mlp, router: prefill FLOPs of q/k/v/o, QK^T, AV, the MLP, the router.
        scoring: prefill FLOPs of FastV's last-token attention row (0 elsewhere).
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
    scoring: int = 0

    @property
    def flops(self) -> int:
        """Prefill FLOPs of the layer."""
        return self.attn_proj + self.attn_scores + self.attn_values + self.mlp + self.router + self.scoring

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "flops": self.flops}


def layer_cost(
    dims: LMDims,
    index: int,
    plan: LayerPlan | float | None,
    n_vision: int,
    n_text: int,
    batch_size: int,
    elem_bytes: int,
    n_question: int | None = None,
) -> LayerCost:
    """Cost of decoder layer ``index`` under ``plan`` (a :class:`LayerPlan`, or a p-MoD ratio; None = dense)."""
    if not isinstance(plan, LayerPlan):
        plan = LayerPlan() if plan is None else LayerPlan(ratio=plan, router_outputs=1)
    n_vision = vision_entering(plan, n_vision)
    t = n_text + n_vision  # tokens entering the layer per sample
    question = n_text if n_question is None else min(n_question, n_text)
    routable = n_vision + (n_text - question if plan.routes_text else 0)
    kept = kept_count(routable, plan.ratio, plan.rounding)
    k = t - routable + kept  # tokens processed per sample
    b, h, hd = batch_size, dims.hidden, dims.head_dim
    proj_width = 2 * dims.heads * hd + 2 * dims.kv_heads * hd  # q + o, k + v
    proj_per_token = 2 * h * proj_width
    mlp_per_token = 3 * 2 * h * dims.intermediate
    router_per_token = 2 * h * plan.router_outputs
    scoring = 0
    if plan.scores_last_token:  # k_proj over the sequence, q_proj of the last token, one QK^T row
        scoring = 2 * t * h * dims.kv_heads * hd + 2 * h * dims.heads * hd + 2 * dims.heads * t * hd
    # A method's own ranking work, declared on a LayerPlan subclass (DART's PivotLayerPlan): a key projection over
    # the sequence (its keys' norms), and rows of a [rows, hidden] @ [hidden, T] similarity (its pivots).
    if getattr(plan, "key_projection", False):
        scoring += 2 * t * h * dims.kv_heads * hd
    scoring += 2 * getattr(plan, "similarity_rows", 0) * t * h
    # One AV or QK^T for a query against `n` keys: 2 * n * head_dim per head.
    decode_attn = 2 * (2 * dims.heads * hd * (k + 1))
    return LayerCost(
        index=index,
        ratio=plan.ratio,
        kept_vision=kept,
        processed=k,
        attn_proj=b * k * proj_per_token,
        attn_scores=b * 2 * dims.heads * k * k * hd,
        attn_values=b * 2 * dims.heads * k * k * hd,
        mlp=b * k * mlp_per_token,
        router=b * t * router_per_token,
        kv_bytes=2 * b * k * dims.kv_heads * hd * elem_bytes,
        decode=b * (proj_per_token + mlp_per_token + router_per_token + decode_attn),
        scoring=b * scoring,
    )


def vision_entering(plan: LayerPlan | None, n_vision: int) -> int:
    """Vision tokens per sample that reach a layer: fewer than the images gave where the method shortened the
    sequence before the decoder (VisionZip's plan says how many: ``vision_tokens(n_vision)``)."""
    reduced = getattr(plan, "vision_tokens", None)
    return n_vision if reduced is None else reduced(n_vision)


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@dataclass(frozen=True)
class FlopsReport:
    """Dense vs routed cost of one prefill (and one decoding step) of the language model.

    All FLOPs and bytes are totals over the batch. ``include_lm_head`` says whether the headline totals
    (:attr:`dense_flops`, :attr:`routed_flops`, :attr:`tflops_ratio`) include the LM head. ``routed_*`` names the
    routed model under ``method_config``, whichever method it is (in :meth:`to_dict`, whose keys ``pmod flops
    --json`` prints, still ``pmod_*``).
    """

    dims: LMDims
    method_config: MethodConfig
    n_vision: int
    n_text: int
    batch_size: int
    bytes_per_element: int
    dense_layers: list[LayerCost]
    routed_layers: list[LayerCost]
    lm_head_flops: int
    lm_head_decode_flops: int
    include_lm_head: bool = True
    schedule: list[float | None] = field(default_factory=list)
    routed_lm_head_flops: int | None = None

    @property
    def routed_head_flops(self) -> int:
        """The LM head's prefill FLOPs in the routed model: dense's, unless the method shortened the sequence."""
        return self.lm_head_flops if self.routed_lm_head_flops is None else self.routed_lm_head_flops

    @property
    def dense_layers_flops(self) -> int:
        return sum(c.flops for c in self.dense_layers)

    @property
    def routed_layers_flops(self) -> int:
        return sum(c.flops for c in self.routed_layers)

    @property
    def dense_flops(self) -> int:
        return self.dense_layers_flops + (self.lm_head_flops if self.include_lm_head else 0)

    @property
    def routed_flops(self) -> int:
        return self.routed_layers_flops + (self.routed_head_flops if self.include_lm_head else 0)

    @property
    def tflops_ratio(self) -> float:
        return _ratio(self.routed_flops, self.dense_flops)

    @property
    def dense_decode_flops(self) -> int:
        return sum(c.decode for c in self.dense_layers) + (self.lm_head_decode_flops if self.include_lm_head else 0)

    @property
    def routed_decode_flops(self) -> int:
        return sum(c.decode for c in self.routed_layers) + (self.lm_head_decode_flops if self.include_lm_head else 0)

    @property
    def dense_kv_bytes(self) -> int:
        return sum(c.kv_bytes for c in self.dense_layers)

    @property
    def routed_kv_bytes(self) -> int:
        return sum(c.kv_bytes for c in self.routed_layers)

    @property
    def kv_cache_ratio(self) -> float:
        return _ratio(self.routed_kv_bytes, self.dense_kv_bytes)

    @property
    def mean_retention(self) -> float:
        """Mean share of vision tokens the layers process (dense layers count 1; a layer that gets a shortened
        sequence, VisionZip's, counts the share that reaches it)."""

        def share(r: float | None, cost: LayerCost) -> float:
            if r is not None:
                return r
            return cost.kept_vision / self.n_vision if 0 < cost.kept_vision < self.n_vision else 1.0

        # fsum: the PRD values sum to a round number (0.5375 for 32 layers) that plain sum misses by an ulp.
        return math.fsum(share(r, c) for r, c in zip(self.schedule, self.routed_layers)) / len(self.schedule)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; ``layers`` holds the routed per-layer records, ``dense_layers`` the dense ones."""
        return {
            "dense_tflops": self.dense_flops / 1e12,
            "pmod_tflops": self.routed_flops / 1e12,
            "tflops_ratio": self.tflops_ratio,
            "dense_kv_bytes": self.dense_kv_bytes,
            "pmod_kv_bytes": self.routed_kv_bytes,
            "kv_cache_ratio": self.kv_cache_ratio,
            "mean_retention": self.mean_retention,
            "includes_lm_head": self.include_lm_head,
            "dense_flops": self.dense_flops,
            "pmod_flops": self.routed_flops,
            "lm_head_flops": self.lm_head_flops,
            "pmod_lm_head_flops": self.routed_head_flops,
            "dense_flops_without_lm_head": self.dense_layers_flops,
            "pmod_flops_without_lm_head": self.routed_layers_flops,
            "tflops_ratio_without_lm_head": _ratio(self.routed_layers_flops, self.dense_layers_flops),
            "dense_decode_flops": self.dense_decode_flops,
            "pmod_decode_flops": self.routed_decode_flops,
            "decode_flops_ratio": _ratio(self.routed_decode_flops, self.dense_decode_flops),
            "lm_head_decode_flops": self.lm_head_decode_flops,
            "n_vision": self.n_vision,
            "n_text": self.n_text,
            "batch_size": self.batch_size,
            "bytes_per_element": self.bytes_per_element,
            "dims": dataclasses.asdict(self.dims),
            "method": self.method_config.method,
            "method_config": self.method_config.to_dict(),
            "schedule": list(self.schedule),
            "layers": [c.to_dict() for c in self.routed_layers],
            "dense_layers": [c.to_dict() for c in self.dense_layers],
        }


def estimate(
    config_or_dims: LMDims | Mapping[str, Any] | Any,
    method_config: MethodConfig | None = None,
    *,
    n_vision: int,
    n_text: int = DEFAULT_TEXT_TOKENS,
    batch_size: int = 1,
    dtype: Any = "float16",
    include_lm_head: bool = True,
    n_question: int | None = None,
) -> FlopsReport:
    """Analytic prefill/decode FLOPs and KV-cache bytes of the language model, dense and routed.

    Args:
        config_or_dims: :class:`LMDims`, a transformers config (LLaVA configs are read from ``text_config``) or a
            ``config.json`` dict.
        method_config: any method config; None takes the config's stored method, else p-MoD's defaults.
        n_vision, n_text: vision (routable) and text tokens per sample.
        batch_size: samples, all with these token counts.
        dtype: KV-cache element type, a name (``"float16"``) or a ``torch.dtype``.
        include_lm_head: whether the headline totals include the LM head (run on every prefill token).
        n_question: text tokens gamma-MoD always processes (default: all of them).
    """
    if n_vision < 0 or n_text < 0 or n_vision + n_text == 0:
        raise ValueError(f"Token counts must be >= 0 and not both 0, got n_vision={n_vision}, n_text={n_text}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if isinstance(config_or_dims, LMDims):
        dims = config_or_dims
    else:
        dims = LMDims.from_config(config_or_dims)
        if method_config is None:
            method_config = method_config_from(config_or_dims)
    method_config = method_config or method_class(DEFAULT_METHOD)()
    schedule = method_config.layer_ratios(dims.layers)
    plans = method_config.layer_plan(dims.layers)
    elem = bytes_per_element(dtype)
    args = (n_vision, n_text, batch_size, elem, n_question)
    t = n_vision + n_text
    return FlopsReport(
        dims=dims,
        method_config=method_config,
        n_vision=n_vision,
        n_text=n_text,
        batch_size=batch_size,
        bytes_per_element=elem,
        dense_layers=[layer_cost(dims, i, None, *args) for i in range(dims.layers)],
        routed_layers=[layer_cost(dims, i, plan, *args) for i, plan in enumerate(plans)],
        lm_head_flops=2 * batch_size * t * dims.hidden * dims.vocab,
        lm_head_decode_flops=2 * batch_size * dims.hidden * dims.vocab,
        include_lm_head=include_lm_head,
        schedule=schedule,
        routed_lm_head_flops=2 * batch_size * (vision_entering(plans[0], n_vision) + n_text) * dims.hidden * dims.vocab,
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


def counted_flops(counter: Any) -> int:
    """What a finished ``FlopCounterMode`` counted, less the rotary-embedding tables (``rotary_emb`` modules).

    Some transformers releases build the cos/sin tables with a matmul (``inv_freq @ positions``), others with an
    elementwise product; the analytic model counts rotary work as elementwise (0), so this leaves it out either way.
    """
    per_module = counter.get_flop_counts()
    rotary = sum(sum(ops.values()) for name, ops in per_module.items() if name.split(".")[-1] == "rotary_emb")
    return counter.get_total_flops() - rotary
