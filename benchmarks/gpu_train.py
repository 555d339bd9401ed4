"""The training-step section of ``gpu_check.py``: forward + backward and the AdamW step of the dense and the p-MoD
model at full depth with activation checkpointing, halved in depth (and labelled) if that runs out of memory."""

from __future__ import annotations

from typing import Any

import common
import torch
from gpu_tools import build_pair, free_memory, guarded, log, paired_ratios, timer

from pmod.testing import enable_activation_checkpointing

TRAIN_TARGET = 0.70  # step time ratio


def train_case(models: dict[str, torch.nn.Module], setting: dict[str, Any], device: str) -> dict[str, Any]:
    """Forward + backward and the AdamW step of both models, batch 2, activation checkpointing on."""
    batch, n_vision, n_text = setting["train_batch"], setting["n_vision"], setting["n_text"]
    ids, vision = common.prompt(batch, n_vision, n_text, setting["shape"].vocab, device)
    labels = ids.masked_fill(vision, -100)
    for model in models.values():
        enable_activation_checkpointing(model)
        model.train()
    # One optimizer over the p-MoD model's parameters: the shared weights plus the routers (which get no gradient
    # from the dense model's steps, so AdamW leaves them alone there).
    optimizer = torch.optim.AdamW(models["pmod"].parameters(), lr=1e-6, foreach=True)

    def step(name: str) -> common.Metrics:
        model = models[name]
        extra = {"vision_mask": vision} if name == "pmod" else {}

        def forward_backward() -> torch.Tensor:
            loss = model(input_ids=ids, labels=labels, use_cache=False, **extra).loss
            loss.backward()
            return loss.detach()

        with common.PeakMemory(device) as mem:
            fb, loss = timer(forward_backward, device)
            opt, _ = timer(lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)), device)
        return {"seconds": fb + opt, "forward_backward_s": fb, "optimizer_s": opt, "loss": float(loss),
                "peak_memory_delta_bytes": mem.bytes}  # fmt: skip

    log(f"train step: layers={models['dense'].config.num_hidden_layers} batch={batch}")
    samples = common.alternate({"dense": lambda: step("dense"), "pmod": lambda: step("pmod")},
                               1, setting["train_reps"], log)  # fmt: skip
    med = {name: common.medians(runs) for name, runs in samples.items()}
    ratio = med["pmod"]["seconds"] / med["dense"]["seconds"]
    fb_ratio = med["pmod"]["forward_backward_s"] / med["dense"]["forward_backward_s"]
    return {
        "label": f"b{batch} {n_vision}+{n_text}, {models['dense'].config.num_hidden_layers} layers, checkpointing",
        "layers": models["dense"].config.num_hidden_layers,
        "batch_size": batch,
        "dense_s": med["dense"]["seconds"],
        "pmod_s": med["pmod"]["seconds"],
        "time_ratio": ratio,
        "forward_backward_ratio": fb_ratio,
        "paired_ratio_min": min(paired_ratios(samples)),
        "paired_ratio_max": max(paired_ratios(samples)),
        "optimizer_s": med["dense"]["optimizer_s"],
        "dense_peak_memory_delta_bytes": med["dense"]["peak_memory_delta_bytes"],
        "pmod_peak_memory_delta_bytes": med["pmod"]["peak_memory_delta_bytes"],
        "losses_finite": all(s["loss"] == s["loss"] and abs(s["loss"]) != float("inf")
                             for runs in samples.values() for s in runs),  # fmt: skip
        "target": f"time_ratio <= {TRAIN_TARGET}",
        "target_met": ratio <= TRAIN_TARGET,
        "samples": samples,
    }


def train_section(models: dict[str, torch.nn.Module], setting: dict[str, Any], device: str,
                  dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    """The training step at full depth; if that runs out of memory, at half the depth (a fresh pair), labelled."""
    result = guarded(lambda: train_case(models, setting, device), device, "train")
    layers = setting["shape"].layers
    if "out of memory" not in result.get("error", ""):
        return result
    models.clear()
    free_memory(device)
    half = common.Shape(**{**setting["shape"].__dict__, "layers": layers // 2})
    log(f"train step: {layers} layers ran out of memory; trying {half.layers}")
    smaller = build_pair(half, device, dtype)
    retry = guarded(lambda: train_case(smaller, setting, device), device, "train")
    retry["layers_reduced_from"] = layers
    retry["layers_reduced_reason"] = result["error"]
    return retry
