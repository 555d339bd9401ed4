"""The rows of ``pmod ablate``: what each variant trains, and the budgets that make the rows comparable.

Every routed row is held to p-MoD's cost, so that accuracy is the only thing left to compare:

* the vanilla-MoD row and the component ladder (MoD -> +TanhNorm -> +STRing) run a constant ratio on MoD's layers
  (2..L-2), the ratio chosen so that the analytic prefill TFLOPs (:func:`pmod.analysis.analytic_flops.estimate`) come
  closest to p-MoD's; the last rung, +PRD, is p-MoD itself;
* the schedule shapes (constant, linear, cosine = PRD) have p-MoD's mean retention;
* FastV and DART keep the share of vision tokens from layer 2 on, PyramidDrop the share ``lambda`` kept at each
  stage boundary, that comes closest to p-MoD's TFLOPs; PyramidDrop and DART also run at their papers' settings
  (lambda 0.5; keep 0.222 = 128 of 576 from K = 2), at whatever cost those give;
* PyramidDrop's stage boundaries sit where the paper puts them on 32 layers (8, 16, 24: a quarter, half and three
  quarters of the depth), scaled to the model's depth (:func:`pdrop_boundaries`);
* VisionZip reduces each image's vision tokens before the decoder: its ``visionzip`` row keeps the number of
  dominant tokens whose TFLOPs come closest to p-MoD's, with the paper's share of contextual ones; its
  ``visionzip_paper`` row keeps the paper's 54 + 10 of 576 scaled to the image's tokens (:func:`visionzip_paper`);
* gamma-MoD keeps its paper settings (skip half of the routable tokens on the ARank-chosen layers): its cost is
  whatever those layers give, shown beside its accuracy.

A layer keeps ``floor(R n_vision)`` tokens, so only ``n_vision`` ratios differ and a budget can be met only to
one token per routed layer; the solvers return the best ratio on that grid (:func:`grid_ratio`; PyramidDrop:
every ``lambda`` at which a stage's kept count changes, :func:`pdrop_at_budget`). No torch here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pmod.analysis.analytic_flops import estimate
from pmod.analysis.dims import LMDims
from pmod.core import schedules
from pmod.core.config import MethodConfig
from pmod.core.errors import UserError
from pmod.methods import DARTConfig, FastVConfig, GammaMoDConfig, MoDConfig, PDropConfig, PModConfig, VisionZipConfig

#: MoD's layer set (the original code's ``deep_all``); the ladder's constant-ratio rungs route the same layers.
MOD_LAYERS = "deep_all"
#: The depth PyramidDrop's paper places its stage boundaries on (LLaVA-1.5 / NeXT 7B: 32 layers).
PDROP_PAPER_DEPTH = 32


@dataclass(frozen=True)
class Variant:
    """One row of the ablation.

    Attributes:
        name: the key of ``--variants``.
        label: the row's name in the report.
        group: the comparison the row belongs to.
        meaning: one sentence saying what the row trains and why it is there.
        trained: False for training-free methods (evaluated on the trained dense model of the same seed).
        needs_dense: the row needs the trained dense model of its seed (FastV runs on it; gamma-MoD takes its
            ARank layer choice from it).
        blank_images: the row asks its questions about blank images (a control of the task, not a method); a
            trained row is also trained on blank images.
    """

    name: str
    label: str
    group: str
    meaning: str
    trained: bool = True
    needs_dense: bool = False
    blank_images: bool = False


#: The comparisons, as the report heads them.
GROUPS = {
    "baseline": "baseline",
    "ladder": "p-MoD's components, each rung at p-MoD's TFLOPs (p-MoD Table 3)",
    "schedule": "schedule shapes at p-MoD's mean retention (cosine = the +PRD row above)",
    "gamma-MoD": "gamma-MoD (ARank layer choice, shared router, masked routing; its own settings)",
    "training-free": "training-free at p-MoD's TFLOPs, on the trained dense model",
    "training-free-paper": "training-free at the papers' own settings (their own cost), on the trained dense model",
    "task-check": "checks of the task, not methods: does it need many vision tokens? (the trained dense model)",
}
#: The task check's share of vision tokens kept from layer 2 on (issue 24: a task that needs its vision tokens
#: loses at least 10 points with a quarter of them, chosen by FastV's ranking or at random).
CHECK_KEEP = 0.25

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("dense", "dense", "baseline", "the dense model: every layer processes every token; the reference."),
        Variant(
            "mod", "MoD (at p-MoD's TFLOPs)", "ladder",
            "vanilla MoD: the constant ratio on layers 2..L-2 whose analytic TFLOPs come closest to p-MoD's (to one "
            "token per routed layer), raw router weight w+1 on kept tokens, skipped tokens unchanged; the first rung "
            "of p-MoD's Table 3.",
        ),
        Variant(
            "tanh1", "+TanhNorm (alpha 1)", "ladder",
            "MoD's schedule with the weight bounded as 1*tanh(w)+1 instead of w+1.",
        ),
        Variant(
            "tanh", "+TanhNorm (alpha 0.2)", "ladder",
            "the same with p-MoD's bound 0.2*tanh(w)+1: weights stay within 20% of 1.",
        ),
        Variant(
            "string", "+STRing", "ladder",
            "the same, and skipped vision tokens are scaled by their weight too (w~ x), so the router also learns "
            "from the tokens it drops.",
        ),
        Variant(
            "pmod", "+PRD = p-MoD", "ladder",
            "p-MoD as published: TanhNorm 0.2, STRing and the progressive ratio decay (cosine) schedule; the "
            "budget every other routed row is held to.",
        ),
        Variant(
            "constant", "schedule: constant", "schedule",
            "p-MoD with one ratio on every layer but 0, at p-MoD's mean retention.",
        ),
        Variant(
            "linear", "schedule: linear", "schedule",
            "p-MoD with a linearly decaying ratio (same thresholds as PRD), at p-MoD's mean retention.",
        ),
        Variant(
            "gamma_mod", "gamma-MoD (ARank layers)", "gamma-MoD",
            "gamma-MoD: its shared router and masked routing skip half of the non-question tokens on the layers "
            "whose attention rank (ARank, measured on the trained dense model of the same seed) is low.",
            needs_dense=True,
        ),
        Variant(
            "fastv", "FastV (at p-MoD's TFLOPs)", "training-free",
            "FastV on the trained dense model of the same seed, no training: from layer 2 on only the vision "
            "tokens the last token attended to most, as many as give p-MoD's TFLOPs.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "pdrop", "PyramidDrop (at p-MoD's TFLOPs)", "training-free",
            "PyramidDrop on the trained dense model of the same seed, no training: at each stage boundary (the "
            "paper's 8, 16, 24 of 32 layers, scaled to this depth) the kept vision tokens the last token attends to "
            "most are kept, a share lambda of them, lambda chosen to give p-MoD's TFLOPs.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "dart", "DART (at p-MoD's TFLOPs)", "training-free",
            "DART on the trained dense model of the same seed, no training: from layer 2 on only the vision tokens "
            "least similar to a few pivot tokens, as many as give p-MoD's TFLOPs.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "visionzip", "VisionZip (at p-MoD's TFLOPs)", "training-free",
            "VisionZip on the trained dense model of the same seed, no training: each image's vision tokens reduced "
            "before the decoder to the [CLS]-attended dominant ones and a few merged contextual ones (the paper's "
            "share, 10 of 576), as many dominant ones as give p-MoD's TFLOPs.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "pdrop_paper", "PyramidDrop (paper: lambda 0.5)", "training-free-paper",
            "PyramidDrop at its paper's lambda 0.5 (retention 1, 0.5, 0.25, 0.125 over the four stages), boundaries "
            "scaled as above, on the trained dense model of the same seed.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "dart_paper", "DART (paper: keep 0.222, K=2)", "training-free-paper",
            "DART at its paper's setting (128 of 576 vision tokens = 0.222 kept from layer 2 on, 4 + 4 pivots), on "
            "the trained dense model of the same seed.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "visionzip_paper", "VisionZip (paper: 54 + 10 of 576)", "training-free-paper",
            "VisionZip at its paper's setting, 54 dominant + 10 contextual of 576 tokens, scaled to this image's "
            "tokens (the same share, rounded, at least the [CLS] token), on the trained dense model of the same seed.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "check_fastv", "FastV, a quarter of the tokens", "task-check",
            "FastV keeping a quarter of the vision tokens from layer 2 on, on the trained dense model: a task whose "
            "answers need many vision tokens loses clearly here.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "check_random", "a random quarter of the tokens", "task-check",
            "as many vision tokens as the row above, drawn at random (FastV's ranking replaced by a seeded random "
            "draw): what any ranking is worth against none.",
            trained=False, needs_dense=True,
        ),
        Variant(
            "check_blind", "no image (blank)", "task-check",
            "the trained dense model asked about blank images of the same background: a blank image lies outside "
            "the training data, so this may score below the answer-prior baseline that the report prints above "
            "the table; far above it would mean the questions give the answers away.",
            trained=False, needs_dense=True, blank_images=True,
        ),
        Variant(
            "check_imageless", "dense, trained without images", "task-check",
            "the dense model trained and asked with every image blank (its background only), so it never sees a "
            "shape: it can learn only what the questions' words tell, and near the answer-prior baseline means "
            "they do not give the answers away.",
            blank_images=True,
        ),
    ]
}  # fmt: skip


def parse_variants(text: str | None) -> tuple[str, ...]:
    """``--variants`` (comma-separated names) in report order; dense is always included (every row is compared
    with it). A :class:`UserError` names unknown names and the choices."""
    if not text:
        return tuple(VARIANTS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise UserError(f"--variants: unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(VARIANTS)}")  # fmt: skip
    chosen = {"dense", *names}
    return tuple(v for v in VARIANTS if v in chosen)


@dataclass(frozen=True)
class Workload:
    """What the analytic cost is computed for: the language model's shape and one prompt's token counts."""

    dims: LMDims
    n_vision: int
    n_text: int

    def tflops(self, config: MethodConfig | None) -> float:
        """Analytic prefill TFLOPs of the language model under ``config`` (None: dense), LM head included."""
        report = estimate(self.dims, config or PModConfig(), n_vision=self.n_vision, n_text=self.n_text)
        return (report.routed_flops if config is not None else report.dense_flops) / 1e12


def grid_ratio(k: int, n: int, rounding: str = "floor") -> float:
    """The ratio ``k / n``, nudged up where float rounding would make a layer keep ``k - 1`` of ``n`` tokens."""
    ratio = k / n
    while schedules.kept_count(n, ratio, rounding) < k:
        ratio = math.nextafter(ratio, 2.0)
    return ratio


def closest(candidates: Sequence[MethodConfig], workload: Workload, target: float) -> MethodConfig:
    """The config among ``candidates`` whose TFLOPs are closest to ``target`` (ties: the cheaper one)."""
    costs = [workload.tflops(c) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: (abs(costs[i] - target), costs[i]))
    return candidates[best]


def closest_on_grid(make: Callable[[float], MethodConfig], workload: Workload, target: float,
                    rounding: str = "floor") -> MethodConfig:  # fmt: skip
    """The config ``make(k / n_vision)`` (k = 1..n_vision) whose TFLOPs are closest to ``target`` (ties: the
    cheaper one)."""
    n = workload.n_vision
    return closest([make(grid_ratio(k, n, rounding)) for k in range(1, n + 1)], workload, target)


def mod_at_budget(workload: Workload, reference: MethodConfig) -> MoDConfig:
    """Vanilla MoD on its default layers with the constant ratio whose TFLOPs come closest to ``reference``'s."""
    return closest_on_grid(lambda r: MoDConfig(ratio=r, layers=MOD_LAYERS), workload, workload.tflops(reference))


def fastv_at_budget(workload: Workload, reference: MethodConfig, layer: int = 2) -> FastVConfig:
    """FastV from ``layer`` on, keeping the share of vision tokens whose TFLOPs come closest to ``reference``'s."""
    target = workload.tflops(reference)
    return closest_on_grid(lambda r: FastVConfig(layer=layer, keep=r), workload, target, rounding="round")


def dart_at_budget(workload: Workload, reference: MethodConfig, layer: int = 2) -> DARTConfig:
    """DART from ``layer`` on (its other settings the paper's), keeping the share of vision tokens whose TFLOPs come
    closest to ``reference``'s."""
    target = workload.tflops(reference)
    return closest_on_grid(lambda r: DARTConfig(layer=layer, keep=r), workload, target, rounding="round")


#: VisionZip's paper setting on LLaVA-1.5: 54 dominant ([CLS] included) + 10 contextual of 576 vision tokens.
VISIONZIP_PAPER = (54, 10, 576)


def visionzip_paper(n_vision: int) -> VisionZipConfig:
    """The paper's 54 + 10 of 576 at the same share of ``n_vision`` tokens, rounded (64 tokens: 6 + 1); at least the
    [CLS] token is dominant. The authors keep the counts fixed per 576-token view; a tower of another size needs
    the share."""
    dominant, contextual, tokens = VISIONZIP_PAPER
    return VisionZipConfig(dominant=max(1, round(dominant * n_vision / tokens)),
                           contextual=round(contextual * n_vision / tokens))  # fmt: skip


def visionzip_at_budget(workload: Workload, reference: MethodConfig) -> VisionZipConfig:
    """VisionZip with the paper's contextual share and the dominant count (1 .. n_vision - contextual) whose TFLOPs
    come closest to ``reference``'s."""
    contextual = visionzip_paper(workload.n_vision).contextual
    top = max(1, workload.n_vision - contextual)
    candidates = [VisionZipConfig(dominant=d, contextual=contextual) for d in range(1, top + 1)]
    return closest(candidates, workload, workload.tflops(reference))


def pdrop_boundaries(num_layers: int) -> list[int]:
    """PyramidDrop's stage boundaries on a ``num_layers`` decoder: the paper's (8, 16, 24 of
    :data:`PDROP_PAPER_DEPTH` = 32 layers) at the same share of the depth, ``b * num_layers / 32`` rounded half up
    (8 layers: 2, 4, 6; 6 layers: 2, 3, 5; 12 layers: 3, 6, 9). Boundaries that coincide or fall on layer 0 or past
    the last layer are dropped (only below 4 layers)."""
    scaled = {math.floor(b * num_layers / PDROP_PAPER_DEPTH + 0.5) for b in PDropConfig().layers}
    layers = sorted(b for b in scaled if 1 <= b < num_layers)
    if not layers:
        raise UserError(f"PyramidDrop needs a decoder of at least 2 layers for a stage boundary; this has {num_layers}")
    return layers


def pdrop_at_budget(workload: Workload, reference: MethodConfig, layers: Sequence[int] | None = None) -> PDropConfig:
    """PyramidDrop on ``layers`` (default :func:`pdrop_boundaries`) with the ``lambda`` whose TFLOPs come closest to
    ``reference``'s. Stage s keeps ``floor(n lambda^s)`` vision tokens, so the kept counts change only where
    ``lambda = (k / n)^(1/s)``; every such point (nudged up to where float rounding reaches ``k``) is a candidate,
    which covers every distinct configuration in which each stage keeps at least one token."""
    layers = list(layers or pdrop_boundaries(workload.dims.layers))
    n, stages = workload.n_vision, len(layers)

    def reaches(k: int, s: int) -> float:
        keep = min((k / n) ** (1 / s), 1.0)
        while schedules.kept_count(n, keep**s) < k:
            keep = math.nextafter(keep, 2.0)
        return keep

    lowest = reaches(1, stages)  # the last stage keeps one token
    grid = sorted({reaches(k, s) for s in range(1, stages + 1) for k in range(1, n + 1)})
    candidates = [PDropConfig(layers=layers, keep=keep) for keep in grid if keep >= lowest]
    return closest(candidates, workload, workload.tflops(reference))


def constant_at_retention(num_layers: int, mean: float, base: PModConfig) -> PModConfig:
    """``base`` with one ratio on every layer but 0 and mean retention ``mean`` (layer 0 counts 1)."""
    ratio = (num_layers * mean - 1.0) / (num_layers - 1)
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"no constant ratio gives mean retention {mean:.4f} over {num_layers} layers")
    return dataclasses.replace(base, schedule="constant", ratio=ratio, layers=None)


def linear_at_retention(num_layers: int, mean: float, base: PModConfig, iterations: int = 60) -> PModConfig:
    """``base`` with the linear schedule whose mean retention comes closest to ``mean``: its ``beta`` found by
    bisection (the mean rises with beta, with steps where a layer turns dense at ``max_ratio``)."""

    def retention(beta: float) -> float:
        return schedules.mean_retention(
            dataclasses.replace(base, schedule="linear", beta=beta).layer_ratios(num_layers)
        )

    lo, hi = -1.0, 2.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if retention(mid) < mean else (lo, mid)
    beta = min((lo, hi), key=lambda b: abs(retention(b) - mean))
    return dataclasses.replace(base, schedule="linear", beta=beta)


def ladder_rung(ratio: float, num_layers: int, alpha: float, string: bool) -> PModConfig:
    """A ladder rung: MoD's constant schedule and layers, TanhNorm with scale ``alpha``, STRing on or off."""
    layers = schedules.layer_set(MOD_LAYERS, num_layers)
    return PModConfig(schedule="constant", ratio=ratio, layers=layers, weight_norm="tanh", weight_scale=alpha,
                      weight_bias=1.0, string=string)  # fmt: skip


def variant_configs(
    names: Sequence[str], workload: Workload, arank: Sequence[float] | None = None
) -> dict[str, MethodConfig | None]:
    """The method config of each variant in ``names`` (None: dense). gamma-MoD's layers come from ``arank``, the
    per-layer ARank of the trained dense model; without it they stay ``"arank"``, to be resolved per seed."""
    reference = PModConfig()
    layers = workload.dims.layers
    mod = mod_at_budget(workload, reference)
    mean = schedules.mean_retention(reference.layer_ratios(layers))
    configs: dict[str, MethodConfig | None] = {
        "dense": None,
        "mod": mod,
        "tanh1": ladder_rung(mod.ratio, layers, 1.0, string=False),
        "tanh": ladder_rung(mod.ratio, layers, 0.2, string=False),
        "string": ladder_rung(mod.ratio, layers, 0.2, string=True),
        "pmod": reference,
        "constant": constant_at_retention(layers, mean, reference),
        "linear": linear_at_retention(layers, mean, reference),
        "fastv": fastv_at_budget(workload, reference),
        "pdrop": pdrop_at_budget(workload, reference),
        "dart": dart_at_budget(workload, reference),
        "pdrop_paper": PDropConfig(layers=pdrop_boundaries(layers), keep=0.5),
        "dart_paper": DARTConfig(layer=2, keep=0.222),
        "visionzip": visionzip_at_budget(workload, reference),
        "visionzip_paper": visionzip_paper(workload.n_vision),
        "check_fastv": FastVConfig(layer=2, keep=CHECK_KEEP),
        "check_random": FastVConfig(layer=2, keep=CHECK_KEEP, ranking="random"),
        "check_blind": None,
        "check_imageless": None,
    }
    gamma = GammaMoDConfig(layers="arank", arank=None if arank is None else list(arank))
    configs["gamma_mod"] = gamma if arank is None else gamma.resolved(layers)
    return {name: configs[name] for name in names}
