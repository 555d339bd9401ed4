"""Where the time goes inside the layers: torch.profiler over one prefill and a few decode steps, dense vs p-MoD.

``record_function`` regions are added from here (the library is not touched): the decoder layer, its norms,
attention and MLP, the router, and the p-MoD pieces (the rule, the plan's selection, the RoPE gather, the masks).
``combine`` is what is left of a p-MoD layer: the TanhNorm/STRing scaling, the ``where`` and the scatter back.

    python benchmarks/profile_pmod.py --out benchmarks/results/profile.json
    python benchmarks/profile_pmod.py --quick
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import common
import torch
from bench_decode import batch_cache, greedy_decode, prefill
from torch.profiler import ProfilerActivity, profile, record_function

import pmod.core.plan
import pmod.core.routed_layer
import pmod.methods.vision_router

#: p-MoD pieces wrapped by name, where the layer's forward and the p-MoD rule look them up at call time: the rule
#: (router, token weights), the plan's selection, the RoPE gather and the layer's masks.
HELPERS = (
    (pmod.methods.vision_router.VisionRouterRule, "route"),
    (pmod.core.plan.ForwardPlan, "select"),
    (pmod.core.routed_layer.RoutedLayerMixin, "_gathered_rope"),
    (pmod.core.routed_layer, "compacted_mask"),
    (pmod.core.routed_layer, "every_token_mask"),
    (pmod.core.routed_layer, "static_mask"),
)
HELPER_NAMES = tuple(name for _, name in HELPERS)
SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "router")
LAYER = "layer"


def _wrap(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapped


@contextmanager
def regions(models: list[torch.nn.Module]) -> Iterator[None]:
    """Put ``record_function`` regions around the layers, their submodules and the p-MoD helpers."""
    saved_helpers = {(owner, name): getattr(owner, name) for owner, name in HELPERS}
    patched: list[torch.nn.Module] = []
    try:
        for (owner, name), fn in saved_helpers.items():
            setattr(owner, name, _wrap(fn, name))
        for model in models:
            for layer in model.model.layers:
                for module, name in [(layer, LAYER), *((getattr(layer, n, None), n) for n in SUBMODULES)]:
                    if module is not None:
                        module.forward = _wrap(module.forward, name)  # instance attribute, dropped afterwards
                        patched.append(module)
            model.lm_head.forward = _wrap(model.lm_head.forward, "lm_head")
            patched.append(model.lm_head)
        yield
    finally:
        for (owner, name), fn in saved_helpers.items():
            setattr(owner, name, fn)
        for module in patched:
            del module.forward


def breakdown(prof: profile, seconds: float) -> dict[str, float]:
    """Inclusive seconds per region, ``combine`` (layer minus its parts) and ``outside_layers``."""
    cuda = torch.cuda.is_available()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key in (LAYER, "lm_head", *SUBMODULES, *HELPER_NAMES):
            us = event.device_time_total if cuda else event.cpu_time_total
            totals[event.key] = us / 1e6
    parts = sum(v for k, v in totals.items() if k not in (LAYER, "lm_head"))
    totals["combine"] = totals.get(LAYER, 0.0) - parts
    totals["outside_layers"] = seconds - totals.get(LAYER, 0.0)
    totals["total"] = seconds
    return {k: round(v, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def profiled(fn: Callable[[], Any], device: str) -> dict[str, Any]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        seconds, _ = common.timed(fn, device)
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"seconds": seconds, "regions": breakdown(prof, seconds), "top_ops": ops}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_args(parser)
    parser.add_argument("--batch", type=int, default=8, help="decode batch size")
    parser.add_argument("--decode-steps", type=int, default=4)
    args = common.resolve(parser.parse_args(argv), {**common.FULL, "n_vision": [2880]}, common.QUICK)
    dtype = getattr(torch, args.dtype)
    result = common.header(args, __file__, argv)
    dense, routed = common.build_models(common.shape_of(args), args.device, dtype, args.seed)
    models = {"dense": dense, "pmod": routed}
    n_vision = args.n_vision[0]
    ids, vision = common.prompt(1, n_vision, args.n_text, args.vocab, args.device, args.seed)
    extra = {"dense": {}, "pmod": {"vision_mask": vision}}

    result["prefill"], result["decode"] = {}, {}
    with torch.inference_mode():
        states = {}
        for name, model in models.items():  # unprofiled: warm-up and the cache the decode starts from
            states[name], _ = prefill(model, {"input_ids": ids, **extra[name]}, args.device)
            greedy_decode(model, *batch_cache(states[name], args.batch), 1)
        with regions(list(models.values())):
            for name, model in models.items():
                common.log(f"profiling {name} prefill")
                run = functools.partial(model, input_ids=ids, use_cache=False, **extra[name])
                result["prefill"][name] = profiled(run, args.device)
            for name, model in models.items():
                common.log(f"profiling {name} decode, batch {args.batch}")
                cache, token = batch_cache(states[name], args.batch)
                step = functools.partial(greedy_decode, model, cache, token, args.decode_steps)
                result["decode"][name] = profiled(step, args.device)
    for phase in ("prefill", "decode"):
        for name, r in result[phase].items():
            print(f"== {phase} {name}: {r['seconds']:.3f} s\n{r['top_ops']}", file=sys.stderr)
    common.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
