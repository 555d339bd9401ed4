"""Prefill: one batch-1 forward over the whole prompt (no cache, logits on every token), dense vs p-MoD.

Target: p-MoD/dense time ratio <= 1.10 x the analytic FLOPs ratio (``pmod.flops``, LM head included).
With ``--backbone qwen2.5-vl-7b`` (a 7B-shaped Qwen2.5-VL on a 64-frame video, see ``video_backbone.py``) the
logits are computed for the last token only (as ``generate`` does: 8k x 152k fp32 logits would take 5 GB), and the
analytic ratio compared is the one without the LM head.

    python benchmarks/bench_prefill.py --out benchmarks/results/prefill.json
    python benchmarks/bench_prefill.py --backbone qwen2.5-vl-7b --out benchmarks/results/prefill_qwen2_5_vl_video.json
    python benchmarks/bench_prefill.py --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import common
import torch

FULL = {**common.FULL, "n_vision": [2880, 576]}
QUICK = common.QUICK
TARGET_SLACK = 1.10


def measure(
    dense: torch.nn.Module, routed: torch.nn.Module, args: argparse.Namespace, n_vision: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Median prefill time of both models for one prompt length, next to the analytic FLOPs ratio."""
    inputs = common.model_inputs(args, dense, 1, n_vision)
    last_logits_only = args.backbone != "llama"
    extra = {"logits_to_keep": 1} if last_logits_only else {}

    def forward(model: torch.nn.Module, kwargs: dict[str, Any]) -> common.Metrics:
        seconds, out = common.timed(lambda: model(**kwargs, use_cache=False, **extra), args.device)
        del out  # the [1, T, vocab] logits: free them before the next run
        return {"seconds": seconds}

    common.log(f"prefill n_vision={n_vision} n_text={args.n_text} backbone={args.backbone}")
    with torch.inference_mode():
        samples = common.alternate(
            {"dense": lambda: forward(dense, inputs["dense"]), "pmod": lambda: forward(routed, inputs["pmod"])},
            args.warmup,
            args.reps,
            common.log,
        )
    ana = common.analytic(dense, n_vision, args.n_text, 1, dtype, common.method_config(args))
    med = {name: common.medians(s)["seconds"] for name, s in samples.items()}
    low = {name: min(m["seconds"] for m in s) for name, s in samples.items()}
    ratio = med["pmod"] / med["dense"]
    analytic_ratio = ana["tflops_ratio_without_lm_head"] if last_logits_only else ana["tflops_ratio"]
    limit = TARGET_SLACK * analytic_ratio
    head = ana["lm_head_tflops"] if last_logits_only else 0.0  # counted by the analytic totals, not run here
    return {
        "n_vision": n_vision,
        "n_text": args.n_text,
        "batch_size": 1,
        "dense_s": med["dense"],
        "pmod_s": med["pmod"],
        "time_ratio": ratio,
        "dense_min_s": low["dense"],
        "pmod_min_s": low["pmod"],
        "time_ratio_of_minima": low["pmod"] / low["dense"],
        "logits": "last token" if last_logits_only else "every token",
        "analytic_tflops_ratio": analytic_ratio,
        "time_over_analytic": ratio / analytic_ratio,
        "analytic_causal_tflops_ratio": (ana["causal_pmod_tflops"] - head) / (ana["causal_dense_tflops"] - head),
        "dense_tflop_per_s": (ana["dense_tflops"] - head) / med["dense"],
        "pmod_tflop_per_s": (ana["pmod_tflops"] - head) / med["pmod"],
        "dense_causal_tflop_per_s": (ana["causal_dense_tflops"] - head) / med["dense"],
        "pmod_causal_tflop_per_s": (ana["causal_pmod_tflops"] - head) / med["pmod"],
        "target": f"time_ratio <= {TARGET_SLACK} x analytic_tflops_ratio = {limit:.4f}",
        "target_met": ratio <= limit,
        "analytic": ana,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_args(parser, backbones=True)
    args = common.resolve(parser.parse_args(argv), FULL, QUICK)
    dtype = getattr(torch, args.dtype)
    result = common.header(args, __file__, argv)
    dense, routed = common.build_pair(args, dtype)

    result["runs"] = [measure(dense, routed, args, n_vision, dtype) for n_vision in args.n_vision]
    common.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
