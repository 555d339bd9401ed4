"""Decode over a static cache, compiled (CUDA graphs on a GPU), next to the default dynamic cache: each of dense and
p-MoD run its best way (a static cache and ``torch.compile(mode="reduce-overhead", fullgraph=True)`` of the decode
step) and its default way (a dynamic cache, eager), after the same prompt. A section of ``gpu_check.py``.

The decode step gets what ``generate`` gives a compiled step: the new token, its position, and a fixed-size 4-D key
mask ``[B, 1, 1, max_cache_len]`` updated in place, so nothing changes shape between steps.
"""

from __future__ import annotations

from typing import Any

import common
import torch
from gpu_tools import free_memory, guarded, timer
from transformers import DynamicCache, StaticCache

from pmod.core.cache import cache_kwargs


def decode_tokens_per_s(
    model: torch.nn.Module, prompt: dict[str, Any], new_tokens: int, device: str, static: bool
) -> tuple[float, torch.Tensor]:
    """Greedy decode throughput (tokens per second over the batch) after an untimed prefill, and the tokens."""
    ids = prompt["input_ids"]
    bsz, length = ids.shape
    size = length + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=size) if static else DynamicCache(config=model.config)
    step = model
    if static:
        options = {"mode": "reduce-overhead"} if device.startswith("cuda") else {"backend": "eager"}
        step = torch.compile(model, fullgraph=True, **options)
    mask = torch.zeros(bsz, 1, 1, size, dtype=torch.bool, device=ids.device)
    mask[..., :length] = True
    with torch.inference_mode():
        token = model(**prompt, **cache_kwargs(cache), use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

        def run() -> torch.Tensor:
            nonlocal token
            out = []
            for i in range(new_tokens):
                mask[..., length + i] = True
                position = torch.full((bsz, 1), length + i, device=ids.device)
                kwargs = {"attention_mask": mask} if static else {}
                logits = step(input_ids=token, position_ids=position, **kwargs, **cache_kwargs(cache), use_cache=True,
                              logits_to_keep=1).logits  # fmt: skip
                token = logits[:, -1:].argmax(-1)
                out.append(token)
            return torch.cat(out, dim=1)

        seconds, tokens = timer(run, device)
    return bsz * new_tokens / seconds, tokens


def static_decode_section(
    models: dict[str, torch.nn.Module], setting: dict[str, Any], device: str
) -> list[dict[str, Any]]:
    """Per batch of ``static_batches``: tokens/s of dense and p-MoD, static + compiled and dynamic (the default)."""
    runs = []
    shape = setting["shape"]
    for batch in setting["static_batches"]:

        def one(batch: int = batch) -> dict[str, Any]:
            ids, vision = common.prompt(batch, setting["n_vision"], setting["n_text"], shape.vocab, device)
            n = ids.shape[1]
            routed = {"input_ids": ids, "vision_mask": vision, "vision_counts": vision.sum(1).tolist(),
                      "real_counts": [n] * batch}  # fmt: skip
            prompts = {"dense": {"input_ids": ids}, "pmod": routed}
            run: dict[str, Any] = {"label": f"b{batch} {setting['n_vision']}+{setting['n_text']}, static+compiled"}
            for static in (True, False):  # the first static run also compiles: warm up, then measure
                way = "static" if static else "dynamic"
                for name, model in models.items():
                    if static:
                        decode_tokens_per_s(model, prompts[name], setting["new_tokens"], device, True)
                    run[f"{name}_{way}_tokens_per_s"], run[f"{name}_{way}_tokens"] = decode_tokens_per_s(
                        model, prompts[name], setting["new_tokens"], device, static
                    )
            run["same_tokens_static_dynamic"] = all(
                torch.equal(run.pop(f"{name}_static_tokens"), run.pop(f"{name}_dynamic_tokens")) for name in models
            )
            run["ratio_static"] = run["pmod_static_tokens_per_s"] / run["dense_static_tokens_per_s"]
            run["ratio_static_vs_dense_default"] = run["pmod_static_tokens_per_s"] / run["dense_dynamic_tokens_per_s"]
            return run

        runs.append(guarded(one, device, f"static decode b{batch}"))
        free_memory(device)
    return runs
