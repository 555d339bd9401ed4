"""gamma-MoD (Luo et al., ICLR 2025): ARank-chosen MoD layers, one shared vision-language router, masked routing.

* Layer choice: the layers whose attention-map rank (ARank, :mod:`pmod.methods.gamma_arank`) is below the 4th largest
  become MoD layers (most of the model); or an explicit list.
* Router: ONE ``Linear(hidden, 2)`` shared by every MoD layer, on the layer's normalised input; binary softmax,
  routing probability ``p = softmax(.)[..., 1]``.
* Masked routing: every real token is routable (image, system prompt, response) except the question tokens, which
  are always processed. Pass them as ``question_mask``; without it every prompt text token counts as question
  (in training the tokens without a label, at inference every text token of a multi-token chunk).
* Training and prefill keep the top ``floor(n_routable * (1 - skip_ratio))`` routable tokens by ``p``; a decode
  step (a one-token chunk) processes its token when ``p >= decode_threshold`` and otherwise skips the layer and
  leaves no cache entry there. ``prefill_rule="threshold"`` keeps every routable token with
  ``p > prefill_threshold`` instead (the original evaluation code's rule).
* Kept tokens: ``h + p * MLP(LN(h))``; skipped tokens: unchanged.
* Routing loss: cross-entropy of the router logits against the top-k labels (routable tokens only), times
  ``routing_loss_weight``, summed over the MoD layers and added to the LM loss in training.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pmod.core import schedules
from pmod.core.config import LayerPlan, MethodConfig, register_method

if TYPE_CHECKING:
    from torch import nn

    from pmod.methods.gamma_router import GammaMoDRule

#: Where the shared router lives: an attribute of the decoder module (next to its ``layers``).
ROUTER_NAME = "gamma_mod_router"


@register_method
@dataclass
class GammaMoDConfig(MethodConfig):
    """Settings of gamma-MoD.

    Attributes:
        layers: ``"arank"`` (choose from ``arank`` / ``arank_file``) or a list of MoD layer indices.
        arank_file: JSON written by ``pmod arank --json`` (or a plain list of per-layer values).
        arank: per-layer ARank values (filled from ``arank_file`` at conversion).
        threshold_rank: the ``threshold_rank``-th largest ARank is the threshold; layers below it route.
        skip_ratio: share of the routable tokens a MoD layer skips.
        routing_loss_weight: weight of the routing loss added to the LM loss.
        router_bias: whether the shared ``Linear(hidden, 2)`` router has a bias.
        decode_threshold: a decoded token goes through a MoD layer when ``p >= decode_threshold``.
        prefill_rule: ``"top_k"`` (training's rule) or ``"threshold"`` (``p > prefill_threshold``) for multi-token
            chunks outside training.
        renumber_positions: give processed tokens positions 0..K-1, as the original code does (no KV cache);
            off: they keep their own positions.
    """

    method: ClassVar[str] = "gamma_mod"
    display_name: ClassVar[str] = "gamma-MoD"
    paper: ClassVar[str] = "gamma-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal LLMs (ICLR 2025)"
    listing_order: ClassVar[int] = 2

    layers: Literal["arank"] | list[int] = field(
        default="arank", metadata={"help": "arank (from --gamma-mod-arank-file) or MoD layer indices, e.g. 1,2,3"}
    )
    arank_file: str | None = field(default=None, metadata={"help": "JSON of per-layer ARank (pmod arank --json)"})
    arank: list[float] | None = field(default=None, metadata={"help": "per-layer ARank values"})
    threshold_rank: int = field(default=4, metadata={"help": "the k-th largest ARank is the threshold"})
    skip_ratio: float = field(default=0.5, metadata={"help": "share of routable tokens a MoD layer skips"})
    routing_loss_weight: float = field(default=0.01, metadata={"help": "weight of the routing loss"})
    router_bias: bool = field(default=True, metadata={"help": "the shared Linear(hidden, 2) router has a bias"})
    decode_threshold: float = field(default=0.5, metadata={"help": "decoded tokens with p >= this are processed"})
    prefill_rule: Literal["top_k", "threshold"] = field(
        default="top_k", metadata={"help": "top_k, or threshold (p > prefill_threshold) outside training"}
    )
    prefill_threshold: float = field(default=0.005, metadata={"help": "threshold of prefill_rule=threshold"})
    renumber_positions: bool = field(
        default=False, metadata={"help": "positions 0..K-1 for processed tokens (original code; no KV cache)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"skip_ratio {self.skip_ratio} is outside [0, 1); choose a share of tokens to skip.")
        if isinstance(self.layers, str) and self.layers != "arank":
            raise ValueError(f"layers must be 'arank' or a list of layer indices, got {self.layers!r}.")
        if self.threshold_rank < 1:
            raise ValueError(f"threshold_rank must be >= 1, got {self.threshold_rank}.")
        if self.prefill_rule not in ("top_k", "threshold"):
            raise ValueError(f"prefill_rule {self.prefill_rule!r} is unknown; choose top_k or threshold.")

    def resolved(self, num_layers: int) -> GammaMoDConfig:
        """The config with ``layers`` chosen from ARank (read from ``arank_file`` if needed)."""
        if not isinstance(self.layers, str):
            return self
        values = self.arank if self.arank is not None else read_arank_file(self.arank_file)
        if len(values) != num_layers:
            raise ValueError(
                f"The ARank values have {len(values)} entries but the model has {num_layers} layers; compute them "
                f"for this model with `pmod arank`."
            )
        return dataclasses.replace(self, layers=choose_layers(values, self.threshold_rank), arank=list(values))

    def budget_knob(self) -> tuple[str, float, float] | None:
        return ("skip_ratio", 0.0, 1.0 - 1e-6)  # on its layers, which stay as chosen (resolve ARank first)

    def describe(self, num_layers: int) -> str:
        return f"gamma-MoD skip {self.skip_ratio} on layers {self.mod_layers(num_layers)}"

    def mod_layers(self, num_layers: int) -> list[int]:
        return schedules.layer_set(self.resolved(num_layers).layers, num_layers)

    def layer_ratios(self, num_layers: int) -> list[float | None]:
        chosen = set(self.mod_layers(num_layers))
        ratios = [1.0 - self.skip_ratio if i in chosen else None for i in range(num_layers)]
        return schedules.validate_schedule(ratios, num_layers)

    def layer_plan(self, num_layers: int) -> list[LayerPlan]:
        return [
            LayerPlan() if r is None else LayerPlan(ratio=r, router_outputs=2, routes_text=True)
            for r in self.layer_ratios(num_layers)
        ]

    def build(self, decoder: nn.Module, layers: nn.ModuleList) -> dict[int, GammaMoDRule]:
        from pmod.methods.gamma_router import GammaMoDRule, make_shared_router  # torch: only when a model is built

        router = make_shared_router(decoder, layers, self.router_bias)
        return {i: GammaMoDRule(router, r, self) for i, r in enumerate(self.layer_ratios(len(layers))) if r is not None}


def read_arank_file(path: str | None) -> list[float]:
    """Per-layer ARank values from a ``pmod arank --json`` file (``{"arank": [...]}``) or a plain JSON list."""
    if path is None:
        raise ValueError(
            "GammaMoDConfig(layers='arank') needs the ARank values: pass arank_file= (from `pmod arank --json`) "
            "or arank=[...], or give the MoD layers as a list."
        )
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the ARank file {path} ({err}); write it with `pmod arank --json`.") from err
    values = data.get("arank") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"{path} holds no list of per-layer ARank values under 'arank'; write it with `pmod arank`.")
    return [float(v) for v in values]


def choose_layers(values: list[float], threshold_rank: int = 4) -> list[int]:
    """The MoD layers: those whose ARank is below the ``threshold_rank``-th largest value (the paper's 4th).

    Layer 0 stays dense whatever its ARank (transformers sizes masks and positions from its cache).
    """
    if threshold_rank > len(values):
        raise ValueError(f"threshold_rank {threshold_rank} exceeds the {len(values)} layers.")
    threshold = sorted(values, reverse=True)[threshold_rank - 1]
    return [i for i, value in enumerate(values) if value < threshold and i >= schedules.FIRST_ROUTABLE_LAYER]
