"""One-command GPU check: correctness on CUDA, then dense vs p-MoD prefill, decode and training-step timings of a
LLaVA-NeXT-7B-shaped decoder in bf16, written to ``benchmarks/results/gpu_<card>.json`` with one printed table.

Runs on the GPU machine as it is (torch and transformers preinstalled, no network), from the repository root::

    PYTHONPATH=src python benchmarks/gpu_check.py                 # about 5 minutes on one H100
    PYTHONPATH=src python benchmarks/gpu_check.py --sections correctness,prefill
    python benchmarks/gpu_check.py --dry-run                      # tiny sizes on the CPU (the test suite runs it)

Sections:

1. ``correctness`` (:mod:`gpu_correctness`): fp32 and bf16, sdpa and eager (+ flash_attention_2 if importable).
2. ``prefill``: 2880 vision + 64 text tokens at batch 1 and 8, a batch of 8 with LLaVA-NeXT anyres token counts of
   unequal image sizes (left padding), and batch 1 at 576 / 2880 / 5760 / 11520 vision tokens. Time ratio vs the
   analytic *causal* FLOPs ratio (``pmod.flops`` with the blocks above the diagonal of causal attention removed,
   as the flash / efficient kernels skip them; LM head on the last position only, as ``generate`` runs it).
3. ``decode``: 128 new tokens at batch 1, 8 and 32 after the 2880 + 64 prompt, with the KV bytes of each.
3b. ``static_decode`` (:mod:`gpu_static`): the same decode over a static cache with the step compiled
   (``mode="reduce-overhead"``: CUDA graphs), dense and p-MoD each run that way and their default way.
3c. ``overhead``: aten ops and host syncs per routed layer, every method (``count_ops.py``; exact, device-independent).
4. ``train``: forward + backward (+ AdamW) with activation checkpointing, batch 2, at the largest depth that fits.

Dense and p-MoD share their weights (the p-MoD model is a copy whose parameters are the dense model's, plus
routers), alternate in ABBA order after warm-up, and are timed with CUDA events.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' shared pieces, when run as a script
import bench_decode  # noqa: E402
import common  # noqa: E402
import gpu_correctness  # noqa: E402
from gpu_static import static_decode_section  # noqa: E402
from gpu_tools import build_pair, card_name, free_memory, guarded, log, paired_ratios, timer  # noqa: E402
from gpu_train import train_section  # noqa: E402

import pmod  # noqa: E402
from pmod import PModConfig  # noqa: E402
from pmod.analysis.analytic_flops import estimate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("correctness", "overhead", "prefill", "decode", "static_decode", "train")

#: LLaVA-NeXT-7B's language model (Vicuna-7B).
NEXT_7B = common.Shape(layers=32, hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
#: Vision tokens LLaVA-NeXT-7B gives images of (h, w) 672x672, 480x640, 336x336, 1008x336, 1000x667, 512x512,
#: 300x400, 640x480 (anyres with 336-px tiles, unpadded, newline tokens; ``LlavaNextProcessor``'s count).
NEXT_MIXED_VISION = [2928, 2340, 1176, 2376, 2160, 2928, 1368, 2352]

FULL: dict[str, Any] = dict(
    shape=NEXT_7B, n_vision=2880, n_text=64, prefill_batches=[1, 8], mixed=NEXT_MIXED_VISION,
    curve=[576, 2880, 5760, 11520], decode_batches=[1, 8, 32], static_batches=[1, 8, 32], new_tokens=128,
    train_batch=2, warmup=2, reps=5, decode_reps=3, train_reps=3,
)  # fmt: skip
DRY: dict[str, Any] = dict(
    shape=common.Shape(layers=4, hidden=64, heads=4, kv_heads=4, intermediate=128, vocab=256), n_vision=64, n_text=8,
    prefill_batches=[1, 2], mixed=[64, 40, 16], curve=[32, 64], decode_batches=[1, 2], new_tokens=4, train_batch=2,
    warmup=1, reps=1, decode_reps=1, train_reps=1,
    static_batches=[2],  # each batch compiles the step again: on the CPU one batch checks the section
)  # fmt: skip

#: Targets of the GPU issue (checked in this benchmark, never in unit tests).
PREFILL_SLACK = 1.05  # time ratio <= 1.05 x the analytic causal FLOPs ratio
DECODE_TARGET = 1.5  # throughput ratio at batch 32


def causal_flops(config: Any, n_vision: int, n_text: int) -> tuple[float, float]:
    """Dense and p-MoD prefill FLOPs of one row as causal kernels execute them, LM head on the last position."""
    report = estimate(config, PModConfig(), n_vision=n_vision, n_text=n_text, include_lm_head=False)

    def causal(layers: list[Any]) -> float:
        return sum(c.flops - (c.attn_scores + c.attn_values) * (1 - (c.processed + 1) / (2 * c.processed))
                   for c in layers)  # fmt: skip

    head = report.lm_head_decode_flops  # one position
    return causal(report.dense_layers) + head, causal(report.routed_layers) + head


def padded_prompt(n_visions: list[int], n_text: int, vocab: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Rows of half the text, the image block, the rest of the text, left-padded to the longest row.

    ``attention_mask`` is None when every row has the same length (no padding: dense sdpa runs its causal kernel).
    """
    g = torch.Generator().manual_seed(seed)
    seq = max(n_visions) + n_text
    ids = torch.zeros(len(n_visions), seq, dtype=torch.long)
    am = torch.zeros(len(n_visions), seq, dtype=torch.long)
    vm = torch.zeros(len(n_visions), seq, dtype=torch.bool)
    for r, n_vision in enumerate(n_visions):
        start = seq - n_vision - n_text
        ids[r, start:] = torch.randint(4, vocab, (n_vision + n_text,), generator=g)
        am[r, start:] = 1
        vm[r, start + n_text // 2 : start + n_text // 2 + n_vision] = True
    equal = len(set(n_visions)) == 1
    mask = None if equal else am.to(device)
    return {"input_ids": ids.to(device), "attention_mask": mask, "vision_mask": vm.to(device)}


def prefill_case(models: dict[str, torch.nn.Module], label: str, n_visions: list[int], setting: dict[str, Any],
                 device: str, reps: int, attention_path: str = "auto") -> dict[str, Any]:  # fmt: skip
    """Median prefill time of both models on one batch, against the analytic causal FLOPs ratio.
    ``attention_path``: how p-MoD's routed layers attend over rows of unequal counts (``pmod.set_attention_path``)."""
    n_text, vocab = setting["n_text"], setting["shape"].vocab
    inputs = padded_prompt(n_visions, n_text, vocab, device)
    pmod.set_attention_path(models["pmod"], attention_path)

    def forward(name: str) -> common.Metrics:
        kwargs = {k: v for k, v in inputs.items() if v is not None and (name == "pmod" or k != "vision_mask")}
        with common.PeakMemory(device) as mem:
            seconds, out = timer(lambda: models[name](**kwargs, use_cache=False, logits_to_keep=1), device)
        del out
        return {"seconds": seconds, "peak_memory_delta_bytes": mem.bytes}

    log(f"prefill {label}: rows={len(n_visions)} vision={n_visions[:3]}{'...' if len(n_visions) > 3 else ''}")
    try:
        with torch.inference_mode():
            samples = common.alternate({"dense": lambda: forward("dense"), "pmod": lambda: forward("pmod")},
                                       setting["warmup"], reps, log)  # fmt: skip
    finally:
        pmod.set_attention_path(models["pmod"], "auto")
    flops = [causal_flops(models["dense"].config, n, n_text) for n in n_visions]
    dense_flops, pmod_flops = sum(f[0] for f in flops), sum(f[1] for f in flops)
    analytic = pmod_flops / dense_flops
    med = {name: statistics.median(s["seconds"] for s in runs) for name, runs in samples.items()}
    low = {name: min(s["seconds"] for s in runs) for name, runs in samples.items()}
    ratios = paired_ratios(samples)
    ratio = med["pmod"] / med["dense"]
    return {
        "label": label,
        "batch_size": len(n_visions),
        "n_vision": n_visions,
        "n_text": n_text,
        "padded": inputs["attention_mask"] is not None,
        "attention_path": attention_path,
        "dense_s": med["dense"],
        "pmod_s": med["pmod"],
        "time_ratio": ratio,
        "time_ratio_of_minima": low["pmod"] / low["dense"],
        "paired_ratio_min": min(ratios),
        "paired_ratio_max": max(ratios),
        "analytic_causal_tflops_ratio": analytic,
        "time_over_analytic": ratio / analytic,
        "dense_tflop_per_s": dense_flops / 1e12 / med["dense"],
        "pmod_tflop_per_s": pmod_flops / 1e12 / med["pmod"],
        "dense_peak_memory_delta_bytes": statistics.median(s["peak_memory_delta_bytes"] or 0 for s in samples["dense"]),
        "pmod_peak_memory_delta_bytes": statistics.median(s["peak_memory_delta_bytes"] or 0 for s in samples["pmod"]),
        "target": f"time_over_analytic <= {PREFILL_SLACK}",
        "target_met": ratio / analytic <= PREFILL_SLACK,
        "samples": samples,
    }


def prefill_section(models: dict[str, torch.nn.Module], setting: dict[str, Any], device: str,
                    only: str = "") -> list[dict[str, Any]]:  # fmt: skip
    """The prefill cases whose label matches the regular expression ``only`` (all by default)."""
    n = setting["n_vision"]
    cases = [(f"b{b} {n}+{setting['n_text']}", [n] * b) for b in setting["prefill_batches"]]
    mixed = f"b{len(setting['mixed'])} mixed anyres"
    cases.append((mixed, setting["mixed"]))
    cases += [(f"b1 {v}+{setting['n_text']} (curve)", [v]) for v in setting["curve"] if v != n or 1 not in
              setting["prefill_batches"]]  # fmt: skip
    results = [guarded(lambda c=c: prefill_case(models, *c, setting, device, setting["reps"]), device, c[0])
               for c in cases if re.search(only, c[0])]  # fmt: skip
    # Rows of unequal counts: the default path (packed where the varlen kernel runs) against the padded one.
    if re.search(only, f"{mixed}, padded path"):
        results.append(guarded(lambda: prefill_case(models, f"{mixed}, padded path", setting["mixed"], setting, device,
                                                    setting["reps"], "padded"), device, mixed))  # fmt: skip
    return results


def decode_section(models: dict[str, torch.nn.Module], setting: dict[str, Any], device: str,
                   dtype: torch.dtype) -> list[dict[str, Any]]:  # fmt: skip
    args = argparse.Namespace(
        n_text=setting["n_text"], vocab=setting["shape"].vocab, device=device, seed=0, batch_prefill=False,
        new_tokens=setting["new_tokens"], warmup=1, reps=setting["decode_reps"], backbone="llama",
    )  # fmt: skip
    runs = []
    for batch in setting["decode_batches"]:
        def one(batch: int = batch) -> dict[str, Any]:
            run = bench_decode.measure(models, args, setting["n_vision"], batch, dtype)
            run.pop("throughput_target", None), run.pop("throughput_target_met", None)  # the CPU benchmark's target
            run["label"] = f"b{batch} {setting['n_vision']}+{setting['n_text']}, {setting['new_tokens']} new"
            if batch == max(setting["decode_batches"]):
                run["target"] = f"throughput_ratio >= {DECODE_TARGET}"
                run["target_met"] = run["throughput_ratio"] >= DECODE_TARGET
            return run

        runs.append(guarded(one, device, f"decode b{batch}"))
        free_memory(device)
    return runs


def table(result: dict[str, Any]) -> str:
    """One plain-text table of the check."""
    rows = [("section", "case", "dense", "p-MoD", "ratio", "analytic", "target", "met")]
    checks = result.get("correctness", [])
    if checks:
        failed = [c for c in checks if not c["passed"]]
        rows.append(("correctness", f"{len(checks) - len(failed)}/{len(checks)} passed", "", "", "", "", "all",
                     str(not failed)))  # fmt: skip
        for c in failed:
            rows.append(("  FAIL", " ".join(str(c.get(k, "")) for k in ("check", "method", "attn", "dtype")),
                         "", "", "", "", "", "False"))  # fmt: skip

    def fmt(x: Any, spec: str = ".3f") -> str:
        return "" if x is None else format(x, spec)

    for run in result.get("prefill", []):
        if "error" in run:
            rows.append(("prefill", run["label"], "", "", "", "", "", run["error"][:60]))
            continue
        rows.append(("prefill", run["label"], f"{run['dense_s'] * 1e3:.1f} ms", f"{run['pmod_s'] * 1e3:.1f} ms",
                     fmt(run["time_ratio"]), fmt(run["analytic_causal_tflops_ratio"]),
                     f"<= {PREFILL_SLACK} x analytic", f"{run['time_over_analytic']:.3f}x {run['target_met']}"))
    for run in result.get("decode", []):
        if "error" in run:
            rows.append(("decode", run["label"], "", "", "", "", "", run["error"][:60]))
            continue
        rows.append(("decode", run["label"], f"{run['dense_tokens_per_s']:.0f} tok/s",
                     f"{run['pmod_tokens_per_s']:.0f} tok/s", fmt(run["throughput_ratio"]),
                     f"KV {run['kv_ratio']:.3f}", run.get("target", ""), str(run.get("target_met", ""))))
    for run in result.get("static_decode", []):
        if "error" in run:
            rows.append(("static decode", run["label"], "", "", "", "", "", run["error"][:60]))
            continue
        rows.append(("static decode", run["label"], f"{run['dense_static_tokens_per_s']:.0f} tok/s",
                     f"{run['pmod_static_tokens_per_s']:.0f} tok/s", fmt(run["ratio_static"]),
                     f"vs dense default {run['ratio_static_vs_dense_default']:.3f}", "", ""))  # fmt: skip
    for method, phases in result.get("overhead", {}).items():
        rows.append(("overhead", method, "", "", "", " / ".join(f"{p} +{c['ops_per_routed_layer']} ops "
                     f"+{c['extra_syncs']} syncs" for p, c in phases.items()), "", ""))  # fmt: skip
    train = result.get("train")
    if train:
        if "error" in train:
            rows.append(("train", "step", "", "", "", "", "", train["error"][:60]))
        else:
            rows.append(("train", train["label"], f"{train['dense_s']:.3f} s", f"{train['pmod_s']:.3f} s",
                         fmt(train["time_ratio"]), f"fwd+bwd {train['forward_backward_ratio']:.3f}",
                         train["target"], str(train["target_met"])))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that the script runs")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_<card>.json)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--no-cudnn-attention", action="store_true",
                        help="disable sdpa's cuDNN backend (it builds a plan for every new sequence length)")
    parser.add_argument("--prefill-cases", default="", metavar="REGEX",
                        help="only the prefill cases whose label matches (e.g. 'mixed')")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; run on the GPU machine, or use --dry-run for the CPU smoke run")
    setting = DRY if args.dry_run else FULL
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if device == "cpu":
        torch.set_num_threads(common.CPU_THREADS)
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = args.out or RESULTS / f"gpu_{card_name(device)}.json"

    result: dict[str, Any] = {
        "benchmark": "gpu_check",
        "command": " ".join(["PYTHONPATH=src python benchmarks/gpu_check.py", *argv]),
        "dry_run": args.dry_run,
        "machine": common.machine_info(device, dtype),
        "model": setting["shape"].__dict__,
        "pmod_config": PModConfig().to_dict(),
        "sections": sections,
        "cudnn_attention": not args.no_cudnn_attention,
        "flash_attn_importable": "flash_attention_2" in gpu_correctness.attention_backends(torch.bfloat16),
    }

    def save() -> None:  # after every section, so a cut-short run keeps what it measured
        common.write_json(result, out, echo=False)

    if "correctness" in sections:
        log("correctness")
        result["correctness"] = gpu_correctness.run_all(device, log)
        save()
    if "overhead" in sections:
        log("overhead counts")
        import count_ops

        result["overhead"] = {m: {p: {k: count_ops.measure(m)[p][k] for k in ("ops_per_routed_layer", "extra_syncs")}
                                  for p in ("prefill", "decode")} for m in count_ops.METHODS}  # fmt: skip
        save()
    if {"prefill", "decode", "static_decode", "train"} & set(sections):
        log(f"building the {setting['shape'].layers}-layer pair on {device}")
        models = build_pair(setting["shape"], device, dtype)
        if "prefill" in sections:
            result["prefill"] = prefill_section(models, setting, device, args.prefill_cases)
            save()
        if "decode" in sections:
            result["decode"] = decode_section(models, setting, device, dtype)
            save()
        if "static_decode" in sections:
            result["static_decode"] = static_decode_section(models, setting, device)
            save()
        if "train" in sections:
            result["train"] = train_section(models, setting, device, dtype)
            save()
    result["table"] = table(result)
    save()
    print(result["table"])
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
