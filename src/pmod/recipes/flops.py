"""``pmod flops``: analytic FLOPs and KV-cache bytes of dense vs a routing method, as a table or JSON.

The conventions (what is counted and how) are in :mod:`pmod.analysis.flops`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmod.analysis.flops import (
    BYTES_PER_ELEMENT,
    DEFAULT_TEXT_TOKENS,
    PRESETS,
    FlopsReport,
    LMDims,
    estimate,
    method_config_from,
)
from pmod.core.config import MethodConfig, method_names
from pmod.core.errors import UserError
from pmod.recipes import method_flags

# Vision tokens per image when a config does not say: LLaVA-1.5's 576, or LLaVA-NeXT's AnyRes maximum.
_DEFAULT_VISION = 576
_DEFAULT_VISION_BY_TYPE = {"llava_next": 2880}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", help="a local model folder (with config.json) or a config.json file; or use --preset"
    )
    parser.add_argument(
        "--preset", metavar="NAME", help=f"a published model shape instead of a folder: {', '.join(PRESETS)}"
    )
    parser.add_argument(
        "--vision-tokens",
        type=int,
        help="vision tokens per sample (default: the preset's, LLaVA-NeXT 2880, else the config's "
        "image_seq_length, else 576)",
    )
    parser.add_argument(
        "--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="text tokens per sample (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples per batch (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=sorted(BYTES_PER_ELEMENT),
        help="KV-cache element type (default: %(default)s)",
    )
    parser.add_argument(
        "--method",
        choices=method_names(),
        help="routing method to cost (default: the model's stored method, else pmod); its settings below",
    )
    parser.add_argument("--question-tokens", type=int, help="gamma-MoD: text tokens always processed (default all)")
    method_flags.add_method_arguments(parser)
    parser.add_argument(
        "--no-lm-head",
        action="store_true",
        help="leave the LM head out of the totals (it is included by default, run on every prefill token)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    for flag, value, least in (
        ("--vision-tokens", args.vision_tokens, 0),
        ("--text-tokens", args.text_tokens, 0),
        ("--batch-size", args.batch_size, 1),
    ):
        if value is not None and value < least:
            raise UserError(f"{flag} is {value}; give a number >= {least}")
    name, dims, stored, default_vision = _load_source(args)
    method = args.method or (stored.method if stored is not None else "pmod")
    config = method_flags.config_from_values(vars(args), method, base=stored)
    n_vision = default_vision if args.vision_tokens is None else args.vision_tokens
    try:
        report = estimate(
            dims,
            config,
            n_vision=n_vision,
            n_text=args.text_tokens,
            batch_size=args.batch_size,
            dtype=args.dtype,
            include_lm_head=not args.no_lm_head,
            n_question=args.question_tokens,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.json:
        print(json.dumps({"model": name, **report.to_dict()}, indent=2))
    else:
        print(format_report(report, name))
    return 0


def _load_source(args: argparse.Namespace) -> tuple[str, LMDims, MethodConfig | None, int]:
    """(name, dims, the config's method settings, default vision tokens) from ``--preset`` or a folder/config.json."""
    if args.preset and args.model:
        raise UserError("give either a model folder/config.json or --preset, not both")
    if args.preset:
        preset = PRESETS.get(args.preset)
        if preset is None:
            raise UserError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        return preset.name, preset.dims, None, preset.n_vision
    if not args.model:
        raise UserError(f"give a model folder or config.json, or --preset (one of {', '.join(PRESETS)})")
    path = Path(args.model)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no config.json" if path.is_dir() else f"{path} does not exist"
        raise UserError(f"{where}; pass a local model folder with config.json, a config.json file, or --preset")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file} as JSON ({err}); pass a valid config.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is not a JSON object; pass a model's config.json")
    try:
        dims = LMDims.from_config(data)
        stored = method_config_from(data)
    except (ValueError, TypeError) as err:
        raise UserError(f"{file}: {err}") from None
    default_vision = _DEFAULT_VISION_BY_TYPE.get(
        data.get("model_type"), data.get("image_seq_length") or _DEFAULT_VISION
    )
    return str(path), dims, stored, int(default_vision)


_FLOP_UNITS = ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs"), (1.0, "FLOPs"))
_BYTE_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def _unit(largest: float, units: tuple[tuple[float, str], ...]) -> tuple[float, str]:
    # The largest unit that keeps the biggest value at or above 1, so every column stays readable.
    return next(((s, n) for s, n in units if largest >= s), units[-1])


def _describe(report: FlopsReport) -> str:
    c = report.method_config
    if c.method == "pmod":
        if c.schedule in ("prd", "linear"):
            return f"p-MoD {c.schedule} (beta {c.beta}, max ratio {c.max_ratio}, min ratio {c.min_ratio})"
        return f"p-MoD constant {c.ratio}" if c.schedule == "constant" else "p-MoD explicit"
    if c.method == "mod":
        return f"MoD constant {c.ratio} on {c.layers if isinstance(c.layers, str) else 'layers ' + str(c.layers)}"
    if c.method == "gamma_mod":
        return f"gamma-MoD skip {c.skip_ratio} on layers {c.mod_layers(report.dims.layers)}"
    if c.method == "fastv":
        return f"FastV K={c.layer} keep {c.keep}"
    return c.method


def format_report(report: FlopsReport, name: str) -> str:
    """The human-readable table of ``pmod flops``."""
    d, t = report.dims, report.n_vision + report.n_text
    scale, unit = _unit(max(c.flops for c in report.dense_layers), _FLOP_UNITS)
    dscale, dunit = _unit(max(c.decode for c in report.dense_layers), _FLOP_UNITS)
    bscale, bunit = _unit(max(c.kv_bytes for c in report.dense_layers), _BYTE_UNITS)
    lines = [
        f"{name}: hidden {d.hidden}, {d.layers} layers, {d.heads} heads / {d.kv_heads} KV heads, head_dim "
        f"{d.head_dim}, MLP {d.intermediate}, vocab {d.vocab}",
        f"per sample: {report.n_vision} vision + {report.n_text} text = {t} tokens; batch {report.batch_size}; "
        f"KV {report.bytes_per_element} bytes/element; schedule {_describe(report)}",
        "",
        f"layers under {report.method_config.method} (prefill in {unit}, decode in {dunit} per step, KV in {bunit}):",
    ]
    header = ("layer", "ratio", "vision", "tokens", "attn proj", "QK^T+AV", "MLP", "router", "total", "vs dense")
    header += ("KV", "decode")
    widths = (5, 6, 7, 7, 10, 10, 10, 8, 10, 9, 9, 9)
    lines.append("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for c, dense in zip(report.pmod_layers, report.dense_layers, strict=True):
        row = (
            str(c.index),
            "dense" if c.ratio is None else f"{c.ratio:.4f}",
            str(c.kept_vision),
            str(c.processed),
            f"{c.attn_proj / scale:.3f}",
            f"{(c.attn_scores + c.attn_values) / scale:.3f}",
            f"{c.mlp / scale:.3f}",
            f"{c.router / scale:.3f}",
            f"{c.flops / scale:.3f}",
            f"{c.flops / dense.flops:.1%}",
            f"{c.kv_bytes / bscale:.1f}",
            f"{c.decode / dscale:.3f}",
        )
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    head = "included" if report.include_lm_head else "excluded"
    r = report.to_dict()
    tscale, tunit = _unit(report.dense_flops, _FLOP_UNITS)
    sscale, sunit = _unit(report.dense_decode_flops, _FLOP_UNITS)
    kscale, kunit = _unit(report.dense_kv_bytes, _BYTE_UNITS)
    summary = (
        (f"prefill {tunit} (LM head {head})", report.dense_flops / tscale, report.pmod_flops / tscale, "%.3f"),
        (
            f"prefill {tunit} without LM head",
            report.dense_layers_flops / tscale,
            report.pmod_layers_flops / tscale,
            "%.3f",
        ),
        (f"decode {sunit} per step", report.dense_decode_flops / sscale, report.pmod_decode_flops / sscale, "%.3f"),
        (f"KV cache {kunit}", report.dense_kv_bytes / kscale, report.pmod_kv_bytes / kscale, "%.2f"),
    )
    lines += ["", f"{'':34}{'dense':>12}{report.method_config.method:>12}{'ratio':>9}"]
    for label, dense_v, pmod_v, fmt in summary:
        ratio = pmod_v / dense_v if dense_v else float("nan")
        lines.append(f"{label:34}{fmt % dense_v:>12}{fmt % pmod_v:>12}{ratio:>9.1%}")
    lines += [
        "",
        f"LM head: {report.lm_head_flops / tscale:.3f} {tunit} on all {t} prefill tokens per sample "
        f"(generate() computes only the last position's logits: {report.lm_head_decode_flops / dscale:.3f} {dunit}).",
        f"mean vision retention {r['mean_retention']:.4f}; attention counted over the full K x K score matrix.",
    ]
    return "\n".join(lines)
