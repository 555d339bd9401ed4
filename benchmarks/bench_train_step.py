"""Training step: batch 2, forward + backward + AdamW step, dense vs p-MoD.

Labels are the input ids on text tokens and -100 on vision tokens (LLaVA's instruction tuning). Target: p-MoD/dense
time ratio <= 0.75.

The full 32-layer model does not fit a 24 GiB CPU machine for this step with every activation saved (see
``memory_plan`` in the JSON): by default the CPU run uses 8 layers and says so in the result
(``layers_reduced_from``). With ``--checkpointing`` (activation checkpointing, as LLaVA's stage 2 trains) only the
layer inputs are kept, and the default is the full depth.

    python benchmarks/bench_train_step.py --out benchmarks/results/train_step.json
    python benchmarks/bench_train_step.py --checkpointing --reps 2 --warmup 0 \
        --out benchmarks/results/train_step_32_layers.json
    python benchmarks/bench_train_step.py --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import common
import torch

from pmod.testing import enable_activation_checkpointing

TARGET = 0.75
BATCH = 2
#: Layers a CPU run uses by default, and why (on a GPU the default stays 32).
CPU_LAYERS = 8
CPU_REASON = (
    "the 32-layer step needs {need:.1f} GB (both models; {one:.1f} GB for one) on a {mem:.1f} GB machine, and ~6 min "
    "of CPU time per dense step (8 layers: 100 s); {layers} layers (with the PRD schedule for {layers} layers) fit "
    "and run in budget"
)


def memory_plan(
    shape: common.Shape, tokens: int, bytes_per_el: int, memory: int | None, checkpointing: bool = False
) -> dict[str, Any]:
    """Rough need of one training step of one model: weights, grads and two AdamW states (4 copies of the
    parameters) plus saved activations, ~27.6k values per token per layer (RMSNorm in/out x2, q/k/v, rotated q/k,
    sdpa output, o_proj input: ~16 x hidden; SwiGLU gate, up, act, product: 4 x intermediate) and the logits
    (logits, log-softmax, their gradient: 3 x vocab per token); with checkpointing, each layer's input and one
    layer's activations. The p-MoD copy doubles the states."""
    h, i, v, layers = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    params = layers * (2 * h * h * (1 + shape.kv_heads / shape.heads) + 3 * h * i + 2 * h) + 2 * v * h + h
    states = 4 * params * bytes_per_el
    per_token = layers * h + 16 * h + 4 * i if checkpointing else layers * (16 * h + 4 * i)
    activations = tokens * (per_token + 3 * v) * bytes_per_el
    need = 2 * states + activations  # both models resident (alternating), one step's activations at a time
    return {
        "layers": layers,
        "params": int(params),
        "weights_grads_adam_bytes_per_model": int(states),
        "activation_bytes_estimate": int(activations),
        "both_models_need_bytes": int(need),
        "machine_memory_bytes": memory,
        "fits": None if memory is None else need < 0.85 * memory,
    }


def measure(
    models: dict[str, torch.nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    args: argparse.Namespace,
    n_vision: int,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Median step time and peak memory of both models for one prompt length."""
    ids, vision = common.prompt(BATCH, n_vision, args.n_text, args.vocab, args.device, args.seed)
    labels = ids.masked_fill(vision, -100)

    def step(name: str) -> common.Metrics:
        model, opt = models[name], optimizers[name]
        kwargs = {"vision_mask": vision} if name == "pmod" else {}

        def run() -> float:
            loss = model(input_ids=ids, labels=labels, use_cache=False, **kwargs).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        with common.PeakMemory(args.device) as mem:
            seconds, loss = common.timed(run, args.device)
        return {"seconds": seconds, "loss": loss, "peak_memory_delta_bytes": mem.bytes}

    common.log(f"train step n_vision={n_vision} n_text={args.n_text} batch={BATCH} layers={args.layers}")
    samples = common.alternate(
        {"dense": lambda: step("dense"), "pmod": lambda: step("pmod")}, args.warmup, args.reps, common.log
    )
    ana = common.analytic(models["dense"], n_vision, args.n_text, BATCH, dtype)
    med = {name: common.medians(s) for name, s in samples.items()}
    low = {name: min(m["seconds"] for m in s) for name, s in samples.items()}
    ratio = med["pmod"]["seconds"] / med["dense"]["seconds"]
    return {
        "n_vision": n_vision,
        "n_text": args.n_text,
        "batch_size": BATCH,
        "layers": args.layers,
        "dense_s": med["dense"]["seconds"],
        "pmod_s": med["pmod"]["seconds"],
        "time_ratio": ratio,
        "dense_min_s": low["dense"],
        "pmod_min_s": low["pmod"],
        "time_ratio_of_minima": low["pmod"] / low["dense"],
        "analytic_tflops_ratio": ana["tflops_ratio"],
        "analytic_causal_tflops_ratio": ana["causal_tflops_ratio"],
        "dense_peak_memory_delta_bytes": med["dense"].get("peak_memory_delta_bytes"),
        "pmod_peak_memory_delta_bytes": med["pmod"].get("peak_memory_delta_bytes"),
        "target": f"time_ratio <= {TARGET}",
        "target_met": ratio <= TARGET,
        "analytic": ana,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_args(parser)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing on both models (CPU default depth: all 32 layers)")
    args = parser.parse_args(argv)
    layers_given = args.layers is not None
    cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    reduced = cpu and not args.checkpointing
    full = {**common.FULL, "layers": CPU_LAYERS if reduced else common.FULL["layers"], "reps": 2}
    args = common.resolve(args, full, common.QUICK)
    dtype = getattr(torch, args.dtype)
    result = common.header(args, __file__, argv)
    shape = common.shape_of(args)
    element = torch.empty((), dtype=dtype).element_size()
    memory = common.machine_info(args.device, dtype)["memory_bytes"] if cpu else torch.cuda.mem_get_info()[1]
    full_shape = common.Shape(**{**result["model"], "layers": common.FULL["layers"]})
    n_tokens = BATCH * (max(args.n_vision) + args.n_text)
    result["checkpointing"] = args.checkpointing
    result["memory_plan"] = {
        "full_model": memory_plan(full_shape, n_tokens, element, memory, args.checkpointing),
        "this_run": memory_plan(shape, n_tokens, element, memory, args.checkpointing),
    }
    if not args.quick and args.layers != common.FULL["layers"]:
        plan = result["memory_plan"]["full_model"]
        one = plan["both_models_need_bytes"] - plan["weights_grads_adam_bytes_per_model"]
        reason = (
            "--layers given"
            if layers_given
            else CPU_REASON.format(
                need=plan["both_models_need_bytes"] / 1e9, one=one / 1e9, mem=(memory or 0) / 1e9, layers=args.layers
            )
        )
        result["layers_reduced_from"] = common.FULL["layers"]
        result["layers_reduced_reason"] = reason
        common.log(f"NOTE: {args.layers} layers instead of {common.FULL['layers']}: {reason}")

    dense, routed = common.build_models(shape, args.device, dtype, args.seed)
    models = {"dense": dense.train(), "pmod": routed.train()}
    if args.checkpointing:
        for model in models.values():
            enable_activation_checkpointing(model)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in models.items()}
    result["runs"] = [measure(models, optimizers, args, n_vision, dtype) for n_vision in args.n_vision]
    common.write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
