"""Shared pieces of the benchmark scripts: model building, prompts, the alternating timing loop, memory readings,
machine info and JSON output.

Every script compares a dense random-weight Llama with a p-MoD copy of it (``pmod.convert`` with the paper's PRD
defaults and random non-zero routers) in one process, alternating the two so that drift of the machine (thermal
state, other load) hits both alike. ``--backbone qwen2.5-vl-7b`` runs a Qwen2.5-VL-7B-shaped model on a video
instead (``video_backbone.py``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
import video_backbone
from transformers import LlamaConfig, LlamaForCausalLM

import pmod
from pmod import PModConfig
from pmod.analysis.analytic_flops import estimate
from pmod.testing import randomize_routers

T = TypeVar("T")
Metrics = dict[str, Any]

#: The real setup: a 32-layer Llama, d=1024, 16 heads, SwiGLU 2816, 32k vocab; 2880 vision + 64 text tokens.
FULL: dict[str, Any] = dict(
    layers=32, hidden=1024, heads=16, kv_heads=16, intermediate=2816, vocab=32000, n_vision=[2880], n_text=64,
    warmup=1, reps=3,
)  # fmt: skip
#: ``--quick``: a smoke run of each script in well under a minute on 2 CPU cores.
QUICK: dict[str, Any] = dict(
    layers=4, hidden=256, heads=4, kv_heads=4, intermediate=704, vocab=4096, n_vision=[576], n_text=64,
    warmup=1, reps=2,
)  # fmt: skip

#: CPU threads by default. On the 2-vCPU benchmark VM two threads were slower than one (d=1024, 4 layers: prefill
#: 9.3 s vs 7.3 s, decode step 145 ms vs 42 ms): the vCPUs share one core's throughput and waking the second
#: OpenMP thread costs up to ~15 ms per parallel op. Pass --threads to override.
CPU_THREADS = 1


@dataclass(frozen=True)
class Shape:
    """The language model's shape."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )


def add_args(parser: argparse.ArgumentParser, backbones: bool = False) -> None:
    """Arguments every script takes; None means: the script's full default, or its quick one with ``--quick``.
    With ``backbones``, also ``--backbone`` (and the video's ``--frames``, ``--frame-size``)."""
    parser.add_argument("--quick", action="store_true", help="small smoke run (< 60 s on 2 CPU cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    for name in ("layers", "hidden", "heads", "kv-heads", "intermediate", "vocab", "n-text", "warmup", "reps"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--n-vision", type=int, nargs="+", default=None, help="vision tokens; several = several runs")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--threads", type=int, default=None, help=f"CPU threads (default {CPU_THREADS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(backbone="llama")
    if not backbones:
        return
    parser.add_argument("--backbone", choices=BACKBONES, default="llama",
                        help=f"llama (default) or {video_backbone.NAME}: a 7B-shaped Qwen2.5-VL on a video")
    parser.add_argument("--frames", type=int, default=None, help=f"{video_backbone.NAME}: video frames (default 64)")
    parser.add_argument("--frame-size", type=int, default=None, help=f"{video_backbone.NAME}: px (default 448)")


BACKBONES = ("llama", video_backbone.NAME)


def resolve(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]) -> argparse.Namespace:
    """Fill the arguments left unset from the full or the quick defaults."""
    defaults = quick if args.quick else full
    if args.backbone == video_backbone.NAME:
        if args.n_vision is not None:
            raise SystemExit(f"--backbone {args.backbone} takes --frames and --frame-size, not --n-vision.")
        defaults = {**defaults, **(video_backbone.QUICK if args.quick else video_backbone.FULL)}
        for key in ("frames", "frame_size"):
            setattr(args, key, getattr(args, key) or defaults[key])
        args.n_vision = [video_backbone.vision_tokens(args.frames, args.frame_size)]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.threads is None and args.device == "cpu":
        args.threads = CPU_THREADS
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def shape_of(args: argparse.Namespace) -> Shape:
    return Shape(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate, args.vocab)


def build_models(
    shape: Shape, device: str, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"
) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random dense Llama and a p-MoD copy of it (PRD defaults, random non-zero routers), both in eval mode."""
    torch.manual_seed(seed)
    dense = LlamaForCausalLM(shape.llama_config())
    dense.set_attn_implementation(attn)
    dense = dense.to(device=device, dtype=dtype).eval()
    routed = pmod.convert(copy.deepcopy(dense), PModConfig())
    # Zero routers give every token weight 1 and ties everywhere; a trained-looking router exercises real top-k.
    randomize_routers(routed, seed=seed)
    return dense, routed.eval()


def build_pair(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The dense model and its p-MoD copy of ``--backbone``."""
    if args.backbone == video_backbone.NAME:
        return video_backbone.build_models(shape_of(args), args.device, dtype, args.seed)
    return build_models(shape_of(args), args.device, dtype, args.seed)


def method_config(args: argparse.Namespace) -> PModConfig:
    """The p-MoD settings of ``--backbone``: the paper's PRD, or its sampled ratios at reduced depth."""
    return video_backbone.method_config(args.layers) if args.backbone == video_backbone.NAME else PModConfig()


def model_inputs(args: argparse.Namespace, model: torch.nn.Module, batch: int, n_vision: int) -> dict[str, Metrics]:
    """Keyword inputs of the dense and the p-MoD model for one prompt: ids (and the vision mask p-MoD needs) for
    the Llama; the processor-like video batch for the Qwen2.5-VL, which finds its video tokens by id."""
    if args.backbone == video_backbone.NAME:
        inputs = video_backbone.video_inputs(model, batch, args.frames, args.frame_size, args.n_text, args.device)
        return {"dense": inputs, "pmod": inputs}
    ids, vision = prompt(batch, n_vision, args.n_text, args.vocab, args.device, args.seed)
    return {"dense": {"input_ids": ids}, "pmod": {"input_ids": ids, "vision_mask": vision}}


def prompt(
    batch: int, n_vision: int, n_text: int, vocab: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` [B, T] and ``vision_mask`` [B, T]: half the text, the image block, the rest of the text
    (LLaVA's "system + USER: <image>\\n question" layout)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, n_vision + n_text), generator=g)
    vision = torch.zeros(batch, n_vision + n_text, dtype=torch.bool)
    vision[:, n_text // 2 : n_text // 2 + n_vision] = True
    return ids.to(device), vision.to(device)


def analytic(
    model: torch.nn.Module,
    n_vision: int,
    n_text: int,
    batch: int,
    dtype: torch.dtype,
    method: PModConfig | None = None,
) -> Metrics:
    """The analytic dense vs p-MoD cost of ``pmod.flops.estimate`` (LM head on every prompt token included)."""
    method = PModConfig() if method is None else method
    d = estimate(model.config, method, n_vision=n_vision, n_text=n_text, batch_size=batch, dtype=dtype)
    keys = (
        "dense_tflops", "pmod_tflops", "tflops_ratio", "tflops_ratio_without_lm_head", "dense_kv_bytes",
        "pmod_kv_bytes", "kv_cache_ratio", "decode_flops_ratio", "mean_retention", "schedule",
    )  # fmt: skip
    result = {k: d.to_dict()[k] for k in keys}

    # pmod.flops counts the full K x K score matrix; sdpa's causal kernels (CPU flash, GPU flash/efficient) skip the
    # blocks above the diagonal, i.e. do ~(K + 1) / 2K of it. Dense layers save more this way than p-MoD layers
    # (larger K), so the executed ratio is a little higher than the headline one.
    def causal(layers: list[Any]) -> float:
        attn = sum((c.attn_scores + c.attn_values) * (1 - (c.processed + 1) / (2 * c.processed)) for c in layers)
        return sum(c.flops for c in layers) - attn + d.lm_head_flops

    result["lm_head_tflops"] = d.lm_head_flops / 1e12
    result["causal_tflops_ratio"] = causal(d.routed_layers) / causal(d.dense_layers)
    result["causal_dense_tflops"] = causal(d.dense_layers) / 1e12
    result["causal_pmod_tflops"] = causal(d.routed_layers) / 1e12
    return result


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str) -> tuple[float, T]:
    """Wall seconds of ``fn()`` (device work included) and its result."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def _proc_kib(path: str, field: str) -> int:
    """A ``Field: N kB`` value of a /proc file."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block above what was in use when it began, in bytes (``.bytes``, None if unknown).

    CUDA: the caching allocator's peak. CPU: peak RSS (VmHWM, reset on entry), best effort: the allocator may
    reuse memory freed before the block, so the figure can be lower than what the block allocated.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._ok = _reset_peak_rss()
            self._base = _proc_kib("/proc/self/status", "VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._ok:
            self.bytes = _proc_kib("/proc/self/status", "VmHWM") * 1024 - self._base


def alternate(
    runs: dict[str, Callable[[], Metrics]], warmup: int, reps: int, log: Callable[[str], None] | None = None
) -> dict[str, list[Metrics]]:
    """Call each run ``warmup`` times (discarded), then ``reps`` times in ABBA order (A B, B A, A B, ...) so that a
    slow drift of the machine does not favour whichever runs first. Returns the metrics of every timed call."""
    names = list(runs)
    for i in range(warmup):
        for name in names:
            runs[name]()
            if log:
                log(f"warm-up {i + 1}/{warmup} {name} done")
    samples: dict[str, list[Metrics]] = {name: [] for name in names}
    for i in range(reps):
        for name in names if i % 2 == 0 else names[::-1]:
            samples[name].append(runs[name]())
            if log:
                log(f"rep {i + 1}/{reps} {name}: {_short(samples[name][-1])}")
    return samples


def _short(metrics: Metrics) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def medians(samples: list[Metrics]) -> Metrics:
    """Median of every numeric metric over the repetitions."""
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        return _proc_kib("/proc/meminfo", "MemTotal") * 1024
    except (OSError, KeyError):
        return None


def machine_info(device: str, dtype: torch.dtype, attn: str = "sdpa") -> Metrics:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total_bytes(),
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "attn_implementation": attn,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pmod": pmod.__version__,
    }


def header(args: argparse.Namespace, script: str, argv: list[str]) -> Metrics:
    """The part of every result that says what ran where, and how to run it again."""
    dtype = getattr(torch, args.dtype)
    video = None
    if args.backbone == video_backbone.NAME:
        video = {"frames": args.frames, "frame_size": args.frame_size, "vision_tokens": args.n_vision[0],
                 "reduced_depth": video_backbone.reduced_depth(args.layers)}  # fmt: skip
    return {
        "benchmark": Path(script).stem,
        "command": " ".join(["python", f"benchmarks/{Path(script).name}", *argv]),
        "quick": args.quick,
        "machine": machine_info(args.device, dtype),
        "backbone": args.backbone,
        **({"video": video} if video else {}),
        "model": asdict(shape_of(args)),
        "pmod_config": method_config(args).to_dict(),
        "warmup": args.warmup,
        "reps": args.reps,
    }


def write_json(result: Metrics, out: Path | None, echo: bool = True) -> None:
    """Write the result to ``out`` (if given) and, with ``echo``, print it."""
    text = json.dumps(result, indent=2)
    if echo:
        print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
