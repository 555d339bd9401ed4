"""Decode: greedy generation of a fixed number of new tokens after a vision-heavy prompt, dense vs p-MoD.

Per batch size: prefill time, decode throughput, peak memory and the exact KV-cache bytes (``pmod.kv_cache_bytes``).
Targets: KV bytes ratio == the analytic ratio (``pmod.flops``); decode throughput ratio p-MoD/dense >= 1.2 at batch 8.

How it runs: each model prefills the prompt once (``logits_to_keep=1``, as ``generate`` does); the first new token
comes from the prefill, the other ``new_tokens - 1`` from a manual greedy loop over the cache (``min_new_tokens =
max_new_tokens``: no early stop), which is what is timed. Every repetition decodes from a fresh copy of the prompt
cache. Without ``--batch-prefill`` the prompt is prefilled for one row and its cache repeated to the batch size
(``batch_repeat_interleave``): the cache then has exactly the shapes a real batch prefill of equal-length prompts
gives (p-MoD keeps ``floor(R * n_vision)`` tokens per row whatever the router scores), and a CPU is spared a
minutes-long batch-8 prefill; the prefill time reported is then that of one row.

    python benchmarks/bench_decode.py --out benchmarks/results/decode.json
    python benchmarks/bench_decode.py --batch 8 --new-tokens 32 --reps 2   # what fits a 2-core CPU's time budget
    python benchmarks/bench_decode.py --quick
    python benchmarks/bench_decode.py --backbone qwen2.5-vl-7b --batch 1 8   # a 7B-shaped Qwen2.5-VL, 64-frame video
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import common
import torch
from transformers import DynamicCache

import pmod
from pmod.core.cache import cache_kwargs

THROUGHPUT_TARGET = 1.2
THROUGHPUT_TARGET_BATCH = 8
#: Decode steps of a warm-up (the timed runs do new_tokens - 1).
WARMUP_STEPS = 4


def greedy_decode(model: torch.nn.Module, cache: DynamicCache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy steps from ``token`` [B, 1] over ``cache`` (updated in place); returns the new tokens."""
    out = []
    for _ in range(steps):
        logits = model(input_ids=token, **cache_kwargs(cache), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def prefill(model: torch.nn.Module, inputs: dict[str, Any], device: str) -> tuple[Any, common.Metrics]:
    """Prefill the prompt into a fresh cache; returns ``(cache, first new token)`` and time and peak memory."""
    cache = DynamicCache(config=model.config)

    def run() -> torch.Tensor:
        logits = model(**inputs, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    with common.PeakMemory(device) as mem:
        seconds, token = common.timed(run, device)
    return (cache, token), {"seconds": seconds, "peak_memory_delta_bytes": mem.bytes}


def batch_cache(state: tuple[DynamicCache, torch.Tensor], batch: int) -> tuple[DynamicCache, torch.Tensor]:
    """A fresh copy of a prompt cache (and its first token) with every row repeated up to ``batch`` rows."""
    cache, token = copy.deepcopy(state)
    repeats = batch // token.shape[0]
    if repeats > 1:
        cache.batch_repeat_interleave(repeats)
        token = token.repeat_interleave(repeats, dim=0)
    return cache, token


def decode(
    model: torch.nn.Module, state: tuple[DynamicCache, torch.Tensor], batch: int, steps: int, device: str
) -> common.Metrics:
    """Time ``steps`` greedy steps from a copy of the prompt cache; report throughput, KV bytes and peak memory."""
    with common.PeakMemory(device) as mem:
        cache, token = batch_cache(state, batch)
        kv_prompt = pmod.kv_cache_bytes(cache).total_bytes
        seconds, tokens = common.timed(lambda: greedy_decode(model, cache, token, steps), device)
        kv_end = pmod.kv_cache_bytes(cache).total_bytes
    return {
        "decode_s": seconds,
        "tokens_per_s": batch * steps / seconds,
        "ms_per_step": 1000 * seconds / steps,
        "kv_bytes_prompt": kv_prompt,
        "kv_bytes_end": kv_end,
        "peak_memory_delta_bytes": mem.bytes,
        "generated_tokens": tokens.shape[1] + 1,  # + the token the prefill gave
    }


def measure(
    models: dict[str, torch.nn.Module], args: argparse.Namespace, n_vision: int, batch: int, dtype: torch.dtype
) -> dict[str, Any]:
    """Prefill once per model, then time the decode of both models alternately for one prompt and batch size."""
    rows = batch if args.batch_prefill else 1
    inputs = common.model_inputs(args, models["dense"], rows, n_vision)
    steps = args.new_tokens - 1
    common.log(f"decode n_vision={n_vision} n_text={args.n_text} batch={batch} (prefill rows={rows})")
    with torch.inference_mode():
        if args.backbone == "llama":  # warm the prefill path on a short prompt (a video cannot be cut short)
            for name, model in models.items():
                model(**{k: v[:, :128] for k, v in inputs[name].items()}, use_cache=False)
        states, pre = {}, {}
        for name, model in models.items():
            states[name], pre[name] = prefill(model, inputs[name], args.device)
        common.log(f"prefill: { {n: round(m['seconds'], 3) for n, m in pre.items()} }")
        for _ in range(args.warmup):  # a short decode warms the step path; the full one is what is timed
            for name, model in models.items():
                greedy_decode(model, *batch_cache(states[name], batch), min(WARMUP_STEPS, steps))
        runs = {
            name: (lambda name=name: decode(models[name], states[name], batch, steps, args.device)) for name in models
        }
        samples = common.alternate(runs, 0, args.reps, common.log)

    ana = common.analytic(models["dense"], n_vision, args.n_text, batch, dtype, common.method_config(args))
    med = {name: common.medians(s) for name, s in samples.items()}
    kv_ratio = med["pmod"]["kv_bytes_prompt"] / med["dense"]["kv_bytes_prompt"]
    tput_ratio = med["pmod"]["tokens_per_s"] / med["dense"]["tokens_per_s"]
    run: dict[str, Any] = {
        "n_vision": n_vision,
        "n_text": args.n_text,
        "batch_size": batch,
        "prefill_rows": rows,
        "new_tokens": args.new_tokens,
        "decode_steps_timed": steps,
        "dense_prefill_s": pre["dense"]["seconds"],
        "pmod_prefill_s": pre["pmod"]["seconds"],
        "dense_prefill_peak_memory_delta_bytes": pre["dense"]["peak_memory_delta_bytes"],
        "pmod_prefill_peak_memory_delta_bytes": pre["pmod"]["peak_memory_delta_bytes"],
        "dense_tokens_per_s": med["dense"]["tokens_per_s"],
        "pmod_tokens_per_s": med["pmod"]["tokens_per_s"],
        "throughput_ratio": tput_ratio,
        "dense_ms_per_step": med["dense"]["ms_per_step"],
        "pmod_ms_per_step": med["pmod"]["ms_per_step"],
        "dense_decode_peak_memory_delta_bytes": med["dense"].get("peak_memory_delta_bytes"),
        "pmod_decode_peak_memory_delta_bytes": med["pmod"].get("peak_memory_delta_bytes"),
        "dense_kv_bytes": int(med["dense"]["kv_bytes_prompt"]),
        "pmod_kv_bytes": int(med["pmod"]["kv_bytes_prompt"]),
        "kv_ratio": kv_ratio,
        "analytic_kv_ratio": ana["kv_cache_ratio"],
        "kv_target_met": kv_ratio == ana["kv_cache_ratio"],  # exact: same token counts, same element size
        "kv_ratio_end": med["pmod"]["kv_bytes_end"] / med["dense"]["kv_bytes_end"],
        "analytic_decode_flops_ratio": ana["decode_flops_ratio"],
    }
    if batch == THROUGHPUT_TARGET_BATCH:
        run["throughput_target"] = f"throughput_ratio >= {THROUGHPUT_TARGET}"
        run["throughput_target_met"] = tput_ratio >= THROUGHPUT_TARGET
    run["analytic"] = ana
    run["samples"] = samples
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_args(parser, backbones=True)
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 128)")
    parser.add_argument("--batch-prefill", action="store_true", help="prefill every row instead of repeating one")
    full = {**common.FULL, "batch": [1, 8], "new_tokens": 128}
    quick = {**common.QUICK, "batch": [1, 8], "new_tokens": 16}
    args = common.resolve(parser.parse_args(argv), full, quick)
    dtype = getattr(torch, args.dtype)
    result = common.header(args, __file__, argv)
    result["new_tokens"] = args.new_tokens
    result["cache_built_by"] = "prefill of every row" if args.batch_prefill else "prefill of one row, repeated"
    dense, routed = common.build_pair(args, dtype)
    models = {"dense": dense, "pmod": routed}
    result["runs"] = []
    for n_vision in args.n_vision:
        for batch in args.batch:
            result["runs"].append(measure(models, args, n_vision, batch, dtype))
            common.write_json(result, args.out, echo=False)  # keep what is done if a long run is cut short
    common.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
