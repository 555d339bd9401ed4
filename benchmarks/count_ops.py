"""Host overhead per routed layer: dispatched aten ops and host syncs, every method against the dense model.

For each method (p-MoD, MoD, gamma-MoD, FastV, PyramidDrop, DART) a tiny model (default: a Llama of 8 layers, 6 of
them routed, 2 left-padded rows with unequal vision counts) runs

* **prefill**: a plain forward, ``model(input_ids, attention_mask, vision_mask)`` (logits on every token, the cache
  returned as transformers does by default), and
* **decode**: one step on the cache that forward returned, with the keywords ``generate`` passes at a decode step by
  default (the new token, the grown attention mask, its position ids, ``logits_to_keep=1``, ``use_cache=True``),

next to the same model unconverted. Nothing is timed: the counts are exact and the same on every run.

**Ops** are the aten operators dispatched inside the model's forward, seen by a
``torch.utils._python_dispatch.TorchDispatchMode`` (below autograd, after composite operators are decomposed:
what a backend runs). On a GPU each non-view op is about one kernel launch; views (``func.is_view``) launch none
and are counted apart as well. Per routed layer: ``(routed-model ops - dense ops) / number of routed layers``; the
same difference is also attributed to the decoder layers it happens in (forward hooks on every decoder layer) and
to what runs outside them (pmod's forward pre-hook, the model's mask building).

**Host syncs** are the operations that make the host wait for the device: torch's CUDA sync debug mode
(``torch.cuda.set_sync_debug_mode``) flags every call of c10's ``memcpy_and_sync`` (a blocking device->host copy)
and ``stream_synchronize``; the ops that reach them are counted here on any device (on a CPU nothing waits, but the
same ops would on a GPU):

* ``aten._local_scalar_dense``: ``Tensor.item()``, ``bool(t)``, ``int(t)``, ``float(t)`` copy one element to the
  host (``memcpy_and_sync``).
* ``aten.nonzero``, ``aten.masked_select``, ``aten._unique``, ``aten._unique2``, ``aten.unique_dim``,
  ``aten.unique_consecutive``, ``aten.unique_dim_consecutive``: the output's size depends on the data, so the host
  reads it before allocating the output (``nonzero`` synchronises its stream; the others call it or read a count).
* ``aten.repeat_interleave`` with tensor repeats and no ``output_size``: the total (the cumulative sum's last element)
  is read on the host. ``aten.bincount``: its length (the largest value + 1) is read on the host.
* ``aten.equal``, ``aten.allclose``, ``aten.is_nonzero``: return a Python bool, i.e. an ``.item()`` inside the kernel.
* ``aten.index.Tensor``, ``aten.index_put``, ``aten.index_put_``, ``aten._index_put_impl_`` with a bool (or uint8)
  index: the kernel turns the mask into positions with ``nonzero``.
* ``aten._to_copy`` and ``aten.copy_`` from a non-CPU device to the CPU: a blocking device->host copy.
* ``Tensor.tolist()`` and ``Tensor.numpy()``, counted one each at the Python level (a ``TorchFunctionMode``): they read
  every element on the host, but a CPU tensor's dispatches no aten op (a CUDA tensor's is a device->host
  ``_to_copy``, which is then not counted a second time).

Not counted, as in torch's own mode: ``torch.cuda.synchronize()``, event waits, ops of torch.distributed/sparse.

    python benchmarks/count_ops.py --out benchmarks/results/count_ops.json
    python benchmarks/count_ops.py --backbone llava
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import common
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import pmod
from pmod import DARTConfig, FastVConfig, GammaMoDConfig, MethodConfig, MoDConfig, PDropConfig, PModConfig
from pmod.core.backbone import backbone_for
from pmod.core.cache import cache_kwargs, cache_of
from pmod.testing import llava_batch, randomize_routers, routed_batch, tiny_llama, tiny_llava

LAYERS = 8
ROUTED = list(range(2, LAYERS))  # 6 routed layers, as the p-MoD PRD schedule routes on 8 layers
#: Per method a config that routes layers 2-7 of the 8 (FastV and DART: score in layer 2, prune from layer 3;
#: PyramidDrop: boundaries 2, 4, 6).
METHODS: dict[str, MethodConfig] = {
    "pmod": PModConfig(),
    "mod": MoDConfig(ratio=0.5, layers=ROUTED),
    "gamma_mod": GammaMoDConfig(layers=ROUTED, skip_ratio=0.5),
    "fastv": FastVConfig(layer=ROUTED[0] + 1, keep=0.5),
    "pdrop": PDropConfig(layers=[ROUTED[0], ROUTED[0] + 2, ROUTED[0] + 4], keep=0.5),
    "dart": DARTConfig(layer=ROUTED[0] + 1, keep=0.25),
}
#: (text tokens, vision tokens) per row of the Llama batch; left padding, as for ``generate``.
ROWS = [(16, 48), (24, 24)]
#: The LLaVA batch: (text before, text after) the image of row 0; row 1 has no image (64 vs 0 vision tokens).
LLAVA_TEXT, LLAVA_IMAGES = [(5, 7), (9, 3)], [True, False]
TOP = 12
OUTSIDE = "outside layers"

#: Ops that make the host wait for the device (see the module docstring for why each is here).
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
    "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.bincount", "aten.equal",
    "aten.allclose", "aten.is_nonzero",
})  # fmt: skip
MASK_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
COPY_OPS = frozenset({"aten._to_copy", "aten.copy_"})
HOST_READS = frozenset({torch.Tensor.tolist, torch.Tensor.numpy})


def _is_mask(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def sync_reason(name: str, func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the aten op ``name`` (overload packet name) called with these arguments makes the host wait."""
    if name in SYNC_OPS:
        return True
    if name == "aten.repeat_interleave":  # the overload of tensor repeats alone; the others decompose into it
        return func.__name__ == "repeat_interleave.Tensor" and kwargs.get("output_size") is None
    if name in MASK_INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_mask(i) for i in indices or ())
    if name in COPY_OPS:
        source = args[1] if name == "aten.copy_" else args[0]
        target = args[0].device if name == "aten.copy_" else kwargs.get("device") or source.device
        return source.device.type != "cpu" and torch.device(target).type == "cpu"
    return False


@dataclass
class Counts:
    """What one forward dispatched: ops by name, by where they ran (a decoder layer or outside), syncs by name."""

    ops: Counter = field(default_factory=Counter)
    views: int = 0
    by_place: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ops": sum(self.ops.values()),
            "view_ops": self.views,
            "syncs": sum(self.syncs.values()),
            "sync_ops": dict(sorted(self.syncs.items())),
            "ops_by_place": dict(self.by_place),
        }


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched, and the host syncs among them (:func:`sync_reason`), into ``counts``;
    ``place`` names where they run (set by :func:`place_hooks`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.place = OUTSIDE
        self.in_host_read = False

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.counts.ops[str(func)] += 1
        self.counts.views += bool(func.is_view)
        self.counts.by_place[self.place] += 1
        if not self.in_host_read and sync_reason(name, func, args, kwargs):
            self.counts.syncs[name] += 1
        return func(*args, **kwargs)


class HostReads(TorchFunctionMode):
    """Counts ``Tensor.tolist`` / ``Tensor.numpy`` as one sync each (no aten op sees them on a CPU)."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in HOST_READS:
            return func(*args, **(kwargs or {}))
        self.counter.counts.syncs[f"Tensor.{func.__name__}"] += 1
        self.counter.in_host_read = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.in_host_read = False


@contextmanager
def counting(model: torch.nn.Module | None = None) -> Iterator[Counts]:
    """Count the ops and syncs of the block (see :class:`OpCounter`, :class:`HostReads`); with ``model``, also by the
    decoder layer they run in (``"layer i"``, else ``OUTSIDE``)."""
    counter = OpCounter()
    handles = []
    if model is not None:

        def enter(i: int) -> Callable[..., None]:
            return lambda *_: setattr(counter, "place", f"layer {i}")

        for i, layer in enumerate(backbone_for(model).decoder_layers(model)):
            handles.append(layer.register_forward_pre_hook(enter(i)))
            handles.append(layer.register_forward_hook(lambda *_: setattr(counter, "place", OUTSIDE)))
    try:
        with HostReads(counter), counter:
            yield counter.counts
    finally:
        for handle in handles:
            handle.remove()


def build(method: str, backbone: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict, dict]:
    """The dense model, its converted copy (random non-zero routers), and the prompt inputs of each."""
    if backbone == "llava":
        dense = tiny_llava(num_layers=LAYERS, seed=seed)
        inputs = llava_batch(dense, LLAVA_TEXT, LLAVA_IMAGES, padding_side="left", seed=seed)
        dense_inputs = routed_inputs = inputs  # the routed LLaVA finds its vision tokens by the image token id
    else:
        dense = tiny_llama(num_layers=LAYERS, seed=seed)
        ids, am, vm = routed_batch([(t, v, False) for t, v in ROWS], "left", seed=seed)
        dense_inputs = {"input_ids": ids, "attention_mask": am}
        routed_inputs = {**dense_inputs, "vision_mask": vm}
    routed = pmod.convert(copy.deepcopy(dense), METHODS[method])
    randomize_routers(routed, scale=3.0, seed=seed)
    return dense, routed.eval(), dense_inputs, routed_inputs


def decode_inputs(prompt: dict, token: torch.Tensor, cache: Any) -> dict[str, Any]:
    """The keywords ``generate`` gives the model at the first decode step by default: the new token, the grown
    attention mask, the position ids it derives from that mask, the cache, ``logits_to_keep=1``."""
    am = torch.cat([prompt["attention_mask"], torch.ones_like(token)], dim=1)
    positions = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)[:, -1:]
    return {"input_ids": token, "attention_mask": am, "position_ids": positions, "logits_to_keep": 1,
            "use_cache": True, **cache_kwargs(cache)}  # fmt: skip


def run_counted(model: torch.nn.Module, prompt: dict) -> dict[str, Counts]:
    """Counts of a plain prefill forward and of one decode step on the cache it returned (after one uncounted
    prefill + step: first calls may set things up)."""
    results: dict[str, Counts] = {}
    with torch.no_grad():
        for counted in (False, True):
            with counting(model if counted else None) as prefill:
                out = model(**prompt)
            step = decode_inputs(prompt, out.logits[:, -1].argmax(-1, keepdim=True), cache_of(out))
            with counting(model if counted else None) as decode:
                model(**step)
            results = {"prefill": prefill, "decode": decode}
    return results


def compare(dense: Counts, routed: Counts, routed_idx: list[int]) -> dict[str, Any]:
    """The routed model's extra ops and syncs, in all and per routed layer, and where they come from."""
    n = len(routed_idx)
    d, r = dense.to_dict(), routed.to_dict()
    diff = r["ops"] - d["ops"]
    names = set(dense.ops) | set(routed.ops)
    by_name = {name: routed.ops[name] - dense.ops[name] for name in names if routed.ops[name] != dense.ops[name]}
    top = sorted(by_name.items(), key=lambda kv: (-abs(kv[1]), kv[0]))[:TOP]
    in_layer = {i: routed.by_place[f"layer {i}"] - dense.by_place[f"layer {i}"] for i in routed_idx}
    places = set(dense.by_place) | set(routed.by_place)
    others = sum(routed.by_place[p] - dense.by_place[p] for p in places if p != OUTSIDE) - sum(in_layer.values())
    return {
        "dense": d,
        "routed": r,
        "ops_diff": diff,
        "ops_per_routed_layer": round(diff / n, 2),
        "non_view_ops_per_routed_layer": round((diff - (r["view_ops"] - d["view_ops"])) / n, 2),
        "extra_syncs": r["syncs"] - d["syncs"],
        "extra_syncs_per_routed_layer": round((r["syncs"] - d["syncs"]) / n, 2),
        "ops_diff_in_routed_layers": {f"layer {i}": v for i, v in in_layer.items()},
        "ops_diff_in_other_layers": others,
        "ops_diff_outside_layers": routed.by_place[OUTSIDE] - dense.by_place[OUTSIDE],
        "top_op_differences": [[name, v] for name, v in top],
    }


def measure(method: str, backbone: str = "llama", seed: int = 0) -> dict[str, Any]:
    """Prefill and decode counts of one method against the dense model."""
    dense, routed, dense_inputs, routed_inputs = build(method, backbone, seed)
    routed_idx = sorted(pmod.routed_layers(routed))
    dense_counts, routed_counts = run_counted(dense, dense_inputs), run_counted(routed, routed_inputs)
    return {
        "method_config": routed.config.to_dict().get("pmod_method"),
        "routed_layers": routed_idx,
        **{phase: compare(dense_counts[phase], routed_counts[phase], routed_idx) for phase in ("prefill", "decode")},
    }


def table(methods: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: per method and phase, ops and syncs of both models and the extra ops per routed layer."""
    lines = [
        "| method | phase | dense ops | routed ops | + ops / routed layer | + non-view ops / routed layer "
        "| dense syncs | routed syncs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in methods.items():
        for phase in ("prefill", "decode"):
            c = result[phase]
            lines.append(f"| {name} | {phase} | {c['dense']['ops']} | {c['routed']['ops']} | "
                         f"{c['ops_per_routed_layer']:g} | {c['non_view_ops_per_routed_layer']:g} | "
                         f"{c['dense']['syncs']} | {c['routed']['syncs']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=("llama", "llava"), default="llama")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=common.Path, default=None, help="write the JSON result here")
    args = parser.parse_args(argv)
    methods = {name: measure(name, args.backbone, args.seed) for name in args.methods}
    rows = ROWS if args.backbone == "llama" else {"text": LLAVA_TEXT, "images": LLAVA_IMAGES}
    host_reads = {f"Tensor.{f.__name__}" for f in HOST_READS}
    result = {
        "benchmark": "count_ops",
        "command": " ".join(["python", "benchmarks/count_ops.py", *argv]),
        "machine": common.machine_info("cpu", torch.float32),
        "backbone": args.backbone,
        "model": {"layers": LAYERS, "rows": rows, "padding_side": "left"},
        "sync_ops": sorted(SYNC_OPS | MASK_INDEX_OPS | COPY_OPS | {"aten.repeat_interleave"} | host_reads),
        "methods": methods,
        "table": table(methods),
    }
    common.write_json(result, args.out, echo=False)
    print(result["table"])
    for name, m in methods.items():
        for phase in ("prefill", "decode"):
            top = ", ".join(f"{op} {v:+d}" for op, v in m[phase]["top_op_differences"][:8])
            print(f"{name} {phase}: {top}")
    return result


if __name__ == "__main__":
    main()
