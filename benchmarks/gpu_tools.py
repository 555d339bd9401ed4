"""Measuring helpers of ``gpu_check.py``: the shared-weight model pair, device timers, and a guard that records a
failed case instead of losing the others."""

from __future__ import annotations

import copy
import gc
import re
import traceback
from collections.abc import Callable
from typing import Any

import common
import torch
from transformers import AutoModelForCausalLM

import pmod
from pmod import PModConfig
from pmod.testing import randomize_routers


def log(message: str) -> None:
    common.log(message)


def card_name(device: str) -> str:
    """``nvidia_h100_80gb_hbm3`` for a CUDA device, ``cpu`` otherwise."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def timer(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds of ``fn()`` on the device's timeline (CUDA events), or wall seconds on a CPU."""
    if not device.startswith("cuda"):
        return common.timed(fn, device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3, out


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build_pair(shape: common.Shape, device: str, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.nn.Module]:
    """A random dense Llama made on the device, and a p-MoD model (PRD defaults, random routers) that shares its
    weights: the memory of one model, so that the 7B pair, a batch-32 cache and training states fit one GPU."""
    config = shape.llama_config()
    config.max_position_embeddings = 16384
    torch.manual_seed(seed)
    with torch.device(device):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    shared = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
    routed = pmod.convert(copy.deepcopy(dense, shared), PModConfig())
    randomize_routers(routed, seed=seed)
    return {"dense": dense, "pmod": routed.eval()}


def paired_ratios(samples: dict[str, list[common.Metrics]], key: str = "seconds") -> list[float]:
    """p-MoD / dense per repetition (each pair ran back to back)."""
    return [p[key] / d[key] for d, p in zip(samples["dense"], samples["pmod"])]


def guarded(fn: Callable[[], dict[str, Any]], device: str, label: str) -> dict[str, Any]:
    """Run one case; an out-of-memory or other error is recorded in the result, and the check goes on."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as err:
        free_memory(device)
        return {"label": label, "error": f"out of memory: {str(err).splitlines()[0]}"}
    except Exception as err:  # noqa: BLE001 - one broken case must not lose the others' numbers
        free_memory(device)
        return {"label": label, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
