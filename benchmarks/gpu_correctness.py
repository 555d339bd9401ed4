"""Correctness checks that ``gpu_check.py`` runs on the device before it times anything.

* routed layers of every method (p-MoD, MoD, gamma-MoD, FastV) against the independent references of
  :mod:`pmod.testing.reference` (batch 4: left and right padding, unequal vision counts, a row without an image,
  scattered vision tokens), per attention backend;
* cached generation against recomputation;
* a batch of 8 with mixed lengths against each row alone;
* VisionZip (which acts before the decoder) on LLaVA against its reference, and its cached generation.

Where sdpa packs rows of unequal counts (``pmod.set_attention_path``'s ``auto``: CUDA, half precision), the sdpa
checks run the packed path and the padded path is checked beside it.

fp32 is compared with fixed tolerances. In bf16 a near-tie of two router scores can flip a selection between two
computations that differ only in rounding, so bf16 checks impose the selections the model made (recorded with
``pmod.record_routing``) on the reference, check that those selections are the top-k of the model's own weights,
and then require the model's error against an fp32 reference to be at most ``BF16_SLACK`` times the error of a
bf16 reference against the same fp32 reference: bf16 tolerance measured, not guessed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

import pmod
from pmod import (
    DARTConfig,
    FastVConfig,
    GammaMoDConfig,
    MethodConfig,
    MoDConfig,
    PDropConfig,
    PModConfig,
    RoutingRecord,
)
from pmod.core.cache import cache_kwargs
from pmod.core.packed_attention import varlen_flash_available
from pmod.testing import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    llava_batch,
    llava_next_batch,
    randomize_routers,
    routed_batch,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
)
from pmod.testing.reference import reference_logits, reference_rules

Check = dict[str, Any]

FP32_ATOL = 1e-4
BF16_SLACK = 3.0
ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (6, 17, False)]  # unequal vision counts, a row without
# A random model may pick the image token; recomputing its own output would then count one image token too many.
GEN = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None, suppress_tokens=[IMAGE_TOKEN_ID])

#: Every method pmod carries, on a 6-layer model.
METHODS: dict[str, MethodConfig] = {
    "pmod": PModConfig(schedule="explicit", ratios=[None, 0.9, 0.5, 0.25, 0.15, 0.5]),
    "mod": MoDConfig(ratio=0.5, layers=[1, 2, 4]),
    "gamma_mod": GammaMoDConfig(layers=[1, 2, 3, 5], skip_ratio=0.5),
    "fastv": FastVConfig(layer=2, keep=0.5),
    "pdrop": PDropConfig(layers=[2, 3, 5], keep=0.5),
    "dart": DARTConfig(layer=2, keep=0.45),
}


def attention_backends(dtype: torch.dtype) -> list[str]:
    """sdpa and eager always; flash_attention_2 when flash-attn is importable (half precision only)."""
    backends = ["sdpa", "eager"]
    if dtype != torch.float32 and importlib.util.find_spec("flash_attn") is not None:
        backends.append("flash_attention_2")
    return backends


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _selection_is_top_k(record: RoutingRecord, model: torch.nn.Module, vision: torch.Tensor, real: torch.Tensor,
                        forward: int = 0) -> bool:  # fmt: skip
    """Every routed layer kept the method's count of vision tokens per row, none weighted below a skipped one
    (the weights are monotone in the scores that choose; DART records none)."""
    rounding = round if pmod.get_method_config(model).method in ("fastv", "dart") else math.floor
    vision = vision & real
    for layer, masks in record.processed.items():
        ratio = pmod.layer_ratios(model)[layer]
        kept, weights = masks[forward] & vision, record.weights[layer][forward]
        for b in range(vision.shape[0]):
            n = int(vision[b].sum())
            if int(kept[b].sum()) != rounding(n * ratio):
                return False
            skipped = vision[b] & ~kept[b]
            if weights is None or not (bool(kept[b].any()) and bool(skipped.any())):
                continue
            if weights[b][kept[b]].min() < weights[b][skipped].max():
                return False
    return True


def _bf16_verdict(err_model: float, err_reference: float) -> dict[str, Any]:
    limit = BF16_SLACK * err_reference
    return {
        "max_err_vs_fp32_reference": err_model,
        "bf16_reference_max_err_vs_fp32_reference": err_reference,
        "tolerance": limit,
        "passed": err_model <= limit,
    }


def _models(method: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=6, attn_implementation="eager")  # eager: FastV's reference reads probabilities
    model = pmod.convert(copy.deepcopy(dense), METHODS[method])
    randomize_routers(model, scale=3.0)
    return dense.to(device), model.to(device)


def attention_path_used(path: str, attn: str, device: str, dtype: torch.dtype) -> str:
    """What the routed layers run on rows of unequal counts: ``packed`` (varlen flash on CUDA in half precision,
    per-row sdpa elsewhere) or ``padded``."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if attn != "sdpa" or path == "padded" or (path == "auto" and not varlen_flash_available(probe)):
        return "padded"
    return "packed (varlen flash)" if varlen_flash_available(probe) else "packed (per-row sdpa)"


def check_layers(method: str, device: str, dtype: torch.dtype, attn: str, padding_side: str,
                 path: str = "auto") -> Check:  # fmt: skip
    """Compacted execution of a routed model vs the dense masked reference, on a 4-row padded batch."""
    dense32, model32 = _models(method, device)
    model32.set_attn_implementation(attn)
    if attn == "sdpa":
        pmod.set_attention_path(model32, path)
    ids, am, vm = (t.to(device) for t in routed_batch(ROWS, padding_side))
    real = am.bool()
    result: Check = {"check": "layers", "method": method, "attn": attn, "padding_side": padding_side,
                     "dtype": str(dtype).removeprefix("torch."),
                     "attention_path": attention_path_used(path, attn, device, dtype)}  # fmt: skip
    if dtype == torch.float32:
        with torch.no_grad():
            got = model32(input_ids=ids, attention_mask=am, vision_mask=vm).logits
            want = reference_logits(dense32, reference_rules(model32), ids, am, vm)
        err = _max_err(got[real], want[real])
        return {**result, "max_err": err, "tolerance": FP32_ATOL, "passed": err <= FP32_ATOL}

    model16, dense16 = copy.deepcopy(model32).to(dtype), copy.deepcopy(dense32).to(dtype)
    with torch.no_grad(), pmod.record_routing(model16) as record:
        got = model16(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    chosen = {layer: masks[0] for layer, masks in record.processed.items()}
    with torch.no_grad():
        want32 = reference_logits(dense32, reference_rules(model32), ids, am, vm, processed=chosen)
        want16 = reference_logits(dense16, reference_rules(model16), ids, am, vm, processed=chosen)
    verdict = _bf16_verdict(_max_err(got[real], want32[real]), _max_err(want16[real], want32[real]))
    top_k = _selection_is_top_k(record, model16, vm, real)
    return {**result, **verdict, "selection_is_top_k": top_k, "passed": verdict["passed"] and top_k}


def _greedy(model: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor, vm: torch.Tensor, steps: int,
            record: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], Any]:  # fmt: skip
    """Prefill then ``steps`` cached greedy steps of a bare decoder; returns new tokens, per-step logits, record."""
    cache, logits, new = DynamicCache(), [], []
    with torch.no_grad(), (pmod.record_routing(model) if record else contextlib.nullcontext()) as rec:
        out = model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(cache), use_cache=True)
        step_logits = out.logits[:, -1]
        for _ in range(steps):
            logits.append(step_logits)
            token = step_logits.argmax(-1, keepdim=True)
            new.append(token)
            am = torch.cat([am, torch.ones_like(token)], dim=1)
            step_logits = model(input_ids=token, attention_mask=am, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    return torch.cat(new, dim=1), logits, rec


def _decisions(rec: RoutingRecord, steps: int) -> dict[int, torch.Tensor]:
    """Each routed layer's processed mask over prompt + decoded tokens: the recorded decode steps (gamma-MoD routes
    them), or every decoded token when the layer did not route them (text)."""
    out = {}
    for layer, masks in rec.processed.items():
        prompt, decoded = masks[0], masks[1:]
        if len(decoded) == steps:
            out[layer] = torch.cat([prompt, *decoded], dim=1)
        else:
            out[layer] = torch.cat([prompt, torch.ones(prompt.shape[0], steps, dtype=torch.bool,
                                                       device=prompt.device)], dim=1)  # fmt: skip
    return out


def check_cached_decoder(method: str, device: str, dtype: torch.dtype, steps: int = 12) -> Check:
    """Cached greedy decoding of a routed bare decoder (left padding) vs the reference over the whole sequence."""
    dense, model = _models(method, device)
    model.set_attn_implementation("sdpa")
    ids, am, vm = (t.to(device) for t in routed_batch(ROWS, "left", seed=2))
    result: Check = {"check": "cached_decoding", "method": method, "dtype": str(dtype).removeprefix("torch."),
                     "new_tokens": steps}  # fmt: skip
    run = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    new, logits, rec = _greedy(run, ids, am, vm, steps, record=True)
    full_ids = torch.cat([ids, new], dim=1)
    full_am = torch.cat([am, torch.ones_like(new)], dim=1)
    full_vm = torch.cat([vm, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    positions = slice(ids.shape[1] - 1, full_ids.shape[1] - 1)
    cached = torch.stack(logits, dim=1)
    prompt = ids.shape[1]
    with torch.no_grad():
        if dtype == torch.float32:
            want = reference_logits(dense, reference_rules(model), full_ids, full_am, full_vm, prompt_length=prompt)
            err = _max_err(cached, want[:, positions])
            same_tokens = bool(torch.equal(want[:, positions].argmax(-1), new))
            return {**result, "max_err": err, "tolerance": FP32_ATOL, "same_tokens": same_tokens,
                    "passed": err <= FP32_ATOL and same_tokens}  # fmt: skip
        chosen = _decisions(rec, steps)
        args = (full_ids, full_am, full_vm)
        want32 = reference_logits(dense, reference_rules(model), *args, prompt_length=prompt, processed=chosen)
        dense16 = copy.deepcopy(dense).to(dtype)
        want16 = reference_logits(dense16, reference_rules(run), *args, prompt_length=prompt, processed=chosen)
    want32, want16 = want32[:, positions], want16[:, positions]
    verdict = _bf16_verdict(_max_err(cached, want32), _max_err(want16, want32))
    top_k = _selection_is_top_k(rec, run, vm, am.bool())
    return {**result, **verdict, "selection_is_top_k": top_k, "passed": verdict["passed"] and top_k}


def check_llava_generate(device: str, steps: int = 16) -> Check:
    """fp32: ``generate`` of a routed LLaVA with the cache equals ``use_cache=False`` (tokens and step logits)."""
    model = tiny_llava(num_layers=8)
    pmod.convert(model)
    randomize_routers(model, scale=3.0)
    model.to(device)
    batch = llava_batch(model, [(3, 5), (2, 2), (6, 1), (4, 4)], [True, True, False, True], "left")
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs = dict(max_new_tokens=steps, output_logits=True, return_dict_in_generate=True, **GEN)
    with torch.no_grad():
        cached = model.generate(**batch, **kwargs)
        full = model.generate(**batch, use_cache=False, **kwargs)
    err = max(_max_err(a, b) for a, b in zip(cached.logits, full.logits, strict=True))
    same = bool(torch.equal(cached.sequences, full.sequences))
    return {"check": "llava_generate_cache", "dtype": "float32", "new_tokens": steps, "max_err": err,
            "tolerance": FP32_ATOL, "same_tokens": same, "passed": same and err <= FP32_ATOL}  # fmt: skip


#: LLaVA-NeXT image sizes (tiny tower: 16-px tiles) of the 8-row mixed batch; None = a text-only row.
MIXED_SIZES: list[tuple[int, int] | None] = [(16, 32), (32, 32), None, (32, 16), (16, 16), (32, 32), (16, 32), None]
MIXED_TEXT = [(3, 5), (2, 2), (6, 1), (4, 4), (1, 7), (5, 2), (2, 3), (8, 4)]


def _row(batch: dict[str, torch.Tensor], r: int, pixel_row: int) -> tuple[dict[str, torch.Tensor], int]:
    real = batch["attention_mask"][r].bool()
    row = {"input_ids": batch["input_ids"][r : r + 1, real]}
    row["attention_mask"] = torch.ones_like(row["input_ids"])
    if bool((row["input_ids"] == IMAGE_TOKEN_ID).any()):
        row["pixel_values"] = batch["pixel_values"][pixel_row : pixel_row + 1]
        row["image_sizes"] = batch["image_sizes"][pixel_row : pixel_row + 1]
        pixel_row += 1
    return row, pixel_row


def check_batch_vs_rows(device: str, steps: int = 12) -> Check:
    """fp32: a routed LLaVA-NeXT batch of 8 (mixed image sizes, text-only rows, left padding) generates what each
    row generates alone."""
    model = tiny_llava_next(num_layers=8)
    pmod.convert(model)
    randomize_routers(model, scale=3.0)
    batch = llava_next_batch(model, MIXED_TEXT, MIXED_SIZES, "left")
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=steps, **GEN)[:, -steps:]
    pixel_row, mismatched = 0, []
    for r in range(len(MIXED_SIZES)):
        row, pixel_row = _row(batch, r, pixel_row)
        with torch.no_grad():
            alone = model.generate(**row, max_new_tokens=steps, **GEN)[:, -steps:]
        if not torch.equal(alone[0], together[r]):
            mismatched.append(r)
    return {"check": "batch8_vs_rows", "dtype": "float32", "rows": len(MIXED_SIZES), "new_tokens": steps,
            "mismatched_rows": mismatched, "passed": not mismatched}  # fmt: skip


def check_visionzip(device: str, padding_side: str) -> Check:
    """fp32: VisionZip on a LLaVA batch (unequal image counts, a text-only row) against its reference
    (:mod:`pmod.testing.reference_visionzip`: the tower's own attention weights, per-image loops), and its cached
    generation against recomputation. VisionZip acts before the decoder, so it has no bare-decoder check."""
    from pmod.testing.reference_visionzip import visionzip_reference_logits

    dense = tiny_llava(num_layers=6).to(device)
    config = pmod.VisionZipConfig(dominant=6, contextual=3)
    model = pmod.convert(copy.deepcopy(dense), config)
    batch = llava_batch(dense, [(3, 5), (2, 2), (6, 1), (4, 4)], [True, True, False, True], padding_side)
    batch = {k: v.to(device) for k, v in batch.items()}
    image = batch["input_ids"] == IMAGE_TOKEN_ID
    keep = batch["attention_mask"].bool() & ~(image & ((image.cumsum(1) - 1) % 64 >= config.kept))
    with torch.no_grad():
        got = model(**batch).logits
        want = visionzip_reference_logits(dense, batch, config.dominant, config.contextual)
        err = max(_max_err(got[r, keep[r]], row) for r, row in enumerate(want))
        cached = model.generate(**batch, max_new_tokens=8, **GEN)
        same = bool(torch.equal(cached, model.generate(**batch, max_new_tokens=8, use_cache=False, **GEN)))
    return {"check": "visionzip", "method": "visionzip", "padding_side": padding_side, "dtype": "float32",
            "max_err": err, "tolerance": FP32_ATOL, "same_tokens": same,
            "passed": same and err <= FP32_ATOL}  # fmt: skip


def run_all(device: str, log: Callable[[str], None] = print) -> list[Check]:
    """Every check, fp32 and bf16, on ``device``."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        keys = ("method", "attn", "attention_path", "padding_side", "dtype")
        label = " ".join(str(check[k]) for k in keys if k in check)
        err = check.get("max_err", check.get("max_err_vs_fp32_reference"))
        log(f"{'PASS' if check['passed'] else 'FAIL'} {check['check']} {label} max_err={err}")

    for dtype in (torch.float32, torch.bfloat16):
        for method in METHODS:
            for attn in attention_backends(dtype):
                for side in ("left", "right"):
                    add(check_layers(method, device, dtype, attn, side))
            # sdpa's "auto" packs unequal rows where the varlen kernel runs: check the padded path there too
            if attention_path_used("auto", "sdpa", device, dtype) != "padded":
                add(check_layers(method, device, dtype, "sdpa", "left", path="padded"))
            add(check_cached_decoder(method, device, dtype))
    for side in ("left", "right"):
        add(check_visionzip(device, side))
    add(check_llava_generate(device))
    add(check_batch_vs_rows(device))
    return checks
