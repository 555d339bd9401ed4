"""``pmod flops``: analytic FLOPs and KV-cache bytes of dense vs a routing method, as a table or JSON.

The conventions (what is counted and how) are in :mod:`pmod.analysis.analytic_flops`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pmod.analysis.analytic_flops import (
    BYTES_PER_ELEMENT,
    DEFAULT_TEXT_TOKENS,
    FlopsReport,
    LMDims,
    estimate,
    method_config_from,
    presets,
)
from pmod.analysis.budget import MEASURES, at_budget, budget_config, cost_ratio
from pmod.analysis.dims import vision_tokens, weight_dtype
from pmod.core.config import DEFAULT_METHOD, MethodConfig, method_names
from pmod.core.errors import UserError
from pmod.core.weight_files import check_weight_files
from pmod.io.model_folder import PROCESSOR_FILES
from pmod.recipes import method_flags

#: Vision tokens per sample when the model's config does not say (LLaVA-1.5's 576).
DEFAULT_VISION = 576
#: KV-cache element type when the model's config does not say.
DEFAULT_DTYPE = "float16"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", help="a local model folder (with config.json) or a config.json file; or use --preset"
    )
    parser.add_argument(
        "--preset", metavar="NAME", help=f"a published model shape instead of a folder: {', '.join(presets())}"
    )
    parser.add_argument(
        "--vision-tokens",
        type=int,
        help="vision tokens per sample (default: what the model makes of one image, from its vision config; a "
        "preset's own; else 576)",
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        help=f"text tokens per sample (default: the model's own prompt around the one-line question "
        f"{QUESTION!r}, counted with the folder's processor; {DEFAULT_TEXT_TOKENS} for a preset or without one)",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples per batch (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        choices=sorted(BYTES_PER_ELEMENT),
        help="KV-cache element type (default: the model's weights' dtype from config.json, else float16)",
    )
    parser.add_argument(
        "--method",
        choices=method_names(),
        help="routing method to cost (default: the model's stored method, else pmod); its settings below. On a "
        "routed model another method is costed on the same model shape (the stored settings are not used)",
    )
    parser.add_argument("--question-tokens", type=int, help="gamma-MoD: text tokens always processed (default all)")
    method_flags.add_method_arguments(parser)
    parser.add_argument(
        "--no-lm-head",
        action="store_true",
        help="leave the LM head out of the totals (it is included by default, run on every prefill token)",
    )
    parser.add_argument("--budget", type=float, metavar="SHARE", help="set the method's cost setting (PRD's beta, "
                        "MoD's ratio, FastV's / DART's / PyramidDrop's keep, gamma-MoD's skip ratio, VisionZip's "
                        "dominant) so that its cost comes closest to this share of dense's, e.g. 0.4; prints the "
                        "setting chosen")  # fmt: skip
    parser.add_argument("--budget-measure", choices=MEASURES, default="tflops", help="what --budget is a share of: "
                        "prefill TFLOPs (default) or KV-cache bytes")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--vision-tokens", args.vision_tokens, 0),
        ("--text-tokens", args.text_tokens, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} is {value}; give a number >= {least}")
    name, dims, stored, default_vision, stored_dtype = _load_source(args)
    dtype = args.dtype or stored_dtype or DEFAULT_DTYPE
    method = args.method or (stored.method if stored is not None else DEFAULT_METHOD)
    config = method_flags.config_from_values(vars(args), method, base=stored)
    n_vision = default_vision if args.vision_tokens is None else args.vision_tokens
    n_text = args.text_tokens
    if n_text is None:
        n_text = prompt_text_tokens(Path(args.model)) if args.model else None
        n_text = DEFAULT_TEXT_TOKENS if n_text is None else n_text
    if args.budget is not None:
        config = _at_budget(config, dims, args, n_vision=n_vision, n_text=n_text)
    try:
        report = estimate(
            dims,
            config,
            n_vision=n_vision,
            n_text=n_text,
            batch_size=args.batch_size,
            dtype=dtype,
            include_lm_head=not args.no_lm_head,
            n_question=args.question_tokens,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if config.routes_layers and all(layer.ratio is None for layer in report.routed_layers):
        print(f"pmod flops: warning: no layer is routed ({method} settings that leave every layer dense); these are "
              f"the dense model's costs", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps({"model": name, **report.to_dict()}, indent=2))
    else:
        print(format_report(report, name))
    return 0


def _at_budget(config: MethodConfig, dims: LMDims, args: argparse.Namespace, **workload: int) -> MethodConfig:
    """``config`` with its cost setting chosen for ``--budget``; the choice is printed to stderr."""
    workload.update(batch_size=args.batch_size, n_question=args.question_tokens, include_lm_head=not args.no_lm_head)
    return settings_at_budget("pmod flops", config.resolved(dims.layers), dims, args.budget, args.budget_measure,
                              **workload)  # fmt: skip


def settings_at_budget(
    command: str, config: MethodConfig, dims: LMDims, budget: float, measure: str = "tflops",
    ratios: list[float | None] | None = None, **workload: Any,
) -> MethodConfig:  # fmt: skip
    """``--budget`` of ``command``: ``config`` with its cost setting chosen by :func:`at_budget` for ``workload``
    (``n_vision``, ``n_text``, ...), the choice printed to stderr; an unreachable budget is a one-line
    :class:`UserError`. With ``ratios`` (the per-layer ratios of a model running ``config``) the choice is the one
    :func:`pmod.set_budget` makes for that model (:func:`budget_config`: a trained method's routed shares scaled)."""
    try:
        if ratios is None:
            chosen = at_budget(config, dims, budget, measure=measure, **workload)
        else:
            chosen = budget_config(config, ratios, dims, budget, measure, workload)
    except ValueError as err:
        raise UserError(f"--budget {budget}: {err}") from None
    share = cost_ratio(chosen, dims, measure, **workload)
    print(f"{command}: --budget {budget} of dense's {measure} for {workload['n_vision']} vision + "
          f"{workload['n_text']} text tokens: {budget_setting(chosen)} gives {share:.4f}", file=sys.stderr)  # fmt: skip
    return chosen


def budget_setting(config: MethodConfig) -> str:
    """The cost setting of ``config`` as :func:`settings_at_budget` prints it: ``fastv keep = 0.25``, or a scaled
    p-MoD schedule's per-layer ratios (``pmod ratios = [dense, 0.5, ...]``), which no single knob sets."""
    knob = config.budget_knob()
    if knob is None:
        shares = ", ".join("dense" if r is None else f"{r:.6g}" for r in config.ratios)
        return f"{config.method} ratios = [{shares}]"
    return f"{config.method} {knob[0]} = {getattr(config, knob[0]):.6g}"


def _load_source(args: argparse.Namespace) -> tuple[str, LMDims, MethodConfig | None, int, str | None]:
    """(name, dims, the config's method settings, default vision tokens, the weights' dtype) from ``--preset`` or a
    folder/config.json."""
    if args.preset and args.model:
        raise UserError("give either a model folder/config.json or --preset, not both")
    if args.preset:
        preset = presets().get(args.preset)
        if preset is None:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets())}")
        return preset.name, preset.dims, None, preset.n_vision, None
    if not args.model:
        raise UserError(f"give a model folder or config.json, or --preset (one of {', '.join(presets())})")
    path = Path(args.model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no config.json" if path.is_dir() else f"{path} does not exist"
        raise UserError(f"{where}; pass a local model folder with config.json, a config.json file, or --preset")
    if path.is_dir():
        check_weight_files(path, required=False)  # the costs need no weights, but damaged ones are named
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file} as JSON ({err}); pass a valid config.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object; pass a model's config.json")
    try:
        dims = LMDims.from_config(data)
        stored = method_config_from(data)
        per_image = vision_tokens(data)
    except (ValueError, TypeError) as err:
        raise UserError(f"{file}: {err}") from None
    default_vision = per_image[0] if per_image is not None else DEFAULT_VISION
    return str(path), dims, stored, int(default_vision), weight_dtype(data)


#: The question whose prompt (in the model's own prompt format, with one image) sets the default text length.
QUESTION = "What is shown in this image?"


def prompt_text_tokens(model: Path, question: str = QUESTION) -> int | None:
    """Text tokens of ``question`` with one image in the prompt format of the processor saved in the folder
    ``model`` (its chat template, or the Vicuna v1 prompt of LLaVA-1.5 without one): the tokenized prompt without
    its image placeholder. None when ``model`` holds no processor that loads here."""
    if not model.is_dir() or not any((model / name).is_file() for name in PROCESSOR_FILES):
        return None
    import transformers

    from pmod.io.model_folder import build_prompt

    try:
        processor = transformers.AutoProcessor.from_pretrained(model)
        ids = processor.tokenizer(build_prompt(processor, question, 1))["input_ids"]
    except (OSError, ValueError, ImportError, KeyError, TypeError, UserError) as err:
        print(f"pmod flops: note: the processor in {model} does not load here ({type(err).__name__}); counting "
              f"{DEFAULT_TEXT_TOKENS} text tokens (pass --text-tokens)", file=sys.stderr)  # fmt: skip
        return None
    placeholder = processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", None) or "<image>")
    return sum(1 for i in ids if i != placeholder)


#: Fixed units, whatever the model's size: FLOPs in GFLOPs, bytes in MiB.
GFLOP, MIB = 1e9, 2**20


def _g(value: float) -> str:
    """Four significant digits (a tiny model's numbers stay readable in the fixed units)."""
    return f"{value:.4g}"


def format_report(report: FlopsReport, name: str) -> str:
    """The human-readable table of ``pmod flops``: FLOPs in GFLOPs and bytes in MiB, always."""
    d, t = report.dims, report.n_vision + report.n_text
    method = report.method_config.method
    lines = [
        f"{name}: hidden {d.hidden}, {d.layers} layers, {d.heads} heads / {d.kv_heads} KV heads, head_dim "
        f"{d.head_dim}, MLP {d.intermediate}, vocab {d.vocab}",
        f"per sample: {report.n_vision} vision + {report.n_text} text = {t} tokens; batch {report.batch_size}; "
        f"KV {report.bytes_per_element} bytes/element; {report.method_config.describe(d.layers)}",
        "",
        f"every layer under {method} (ratio 'dense': the layer processes every token); prefill and decode in "
        f"GFLOPs, KV in MiB:",
    ]
    header = ("layer", "ratio", "vision", "tokens", "attn proj", "QK^T+AV", "MLP", "router", "total", "vs dense")
    header += ("KV", "decode")
    widths = (5, 6, 7, 7, 10, 10, 10, 8, 10, 9, 9, 9)
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for c, dense in zip(report.routed_layers, report.dense_layers, strict=True):
        row = (
            str(c.index),
            "dense" if c.ratio is None else f"{c.ratio:.4f}",
            str(c.kept_vision),
            str(c.processed),
            _g(c.attn_proj / GFLOP),
            _g((c.attn_scores + c.attn_values) / GFLOP),
            _g(c.mlp / GFLOP),
            _g((c.router + c.scoring) / GFLOP),
            _g(c.flops / GFLOP),
            f"{c.flops / dense.flops:.1%}",
            _g(c.kv_bytes / MIB),
            _g(c.decode / GFLOP),
        )
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    head = "included" if report.include_lm_head else "excluded"
    r = report.to_dict()
    summary = (
        (f"prefill GFLOPs (LM head {head})", report.dense_flops / GFLOP, report.routed_flops / GFLOP),
        ("prefill GFLOPs without LM head", report.dense_layers_flops / GFLOP, report.routed_layers_flops / GFLOP),
        ("decode GFLOPs per step", report.dense_decode_flops / GFLOP, report.routed_decode_flops / GFLOP),
        ("KV cache MiB", report.dense_kv_bytes / MIB, report.routed_kv_bytes / MIB),
    )
    lines += ["", f"{'':34}{'dense':>12}{method:>12}{'ratio':>9}"]
    for label, dense_v, routed_v in summary:
        ratio = routed_v / dense_v if dense_v else float("nan")
        lines.append(f"{label:34}{_g(dense_v):>12}{_g(routed_v):>12}{ratio:>9.1%}")
    lines += [
        "",
        f"LM head: {_g(report.lm_head_flops / GFLOP)} GFLOPs on all {t} prefill tokens per sample (generate() "
        f"computes only the last position's logits: {_g(report.lm_head_decode_flops / GFLOP)} GFLOPs)"
        + (f"; {method}: {_g(report.routed_head_flops / GFLOP)} GFLOPs on the shortened sequence."
           if report.routed_head_flops != report.lm_head_flops else "."),
        f"mean vision retention {r['mean_retention']:.4f}; attention counted over the full K x K score matrix; "
        f"the router column includes the ranking work of FastV, PyramidDrop and DART.",
    ]
    return "\n".join(lines)
