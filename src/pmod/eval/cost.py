"""The cost of each evaluated request, recorded beside its answer: vision/text tokens, analytic prefill TFLOPs
under the model's method (and what a dense model costs for the same tokens, :mod:`pmod.analysis.analytic_flops`), the KV
cache after prefill (measured on the cache, per row), the measured prefill latency and decode speed of its batch.

Each process appends one JSON line per request to ``<dir>/requests.rank<R>.jsonl`` as its batch finishes;
:func:`summarize` sums them per task (``<dir>/summary.json``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.analysis.analytic_flops import estimate

if TYPE_CHECKING:
    import torch


@dataclass
class RequestCost:
    """Cost of one request. Latency and decode speed are its batch's (``batch`` numbers the batches of a process,
    ``rows`` is the batch size); FLOPs and KV bytes are the request's own."""

    task: str
    doc_id: int
    kind: str  # "generate" or "loglikelihood"
    n_vision: int
    n_text: int
    n_generated: int
    prefill_tflops: float
    dense_prefill_tflops: float
    kv_bytes: int
    dense_kv_bytes: int
    analytic_kv_bytes: int
    prefill_ms: float
    decode_tokens_per_s: float | None
    batch: str
    rows: int


class CostModel:
    """Analytic cost of requests on one model, cached per token count (the same counts recur in a task)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from pmod.core.convert import get_method_config

        self.config = model.config
        self.method_config = get_method_config(model)
        self.dtype = next(model.parameters()).dtype
        self._cache: dict[tuple[int, int], dict[str, Any]] = {}

    def analytic(self, n_vision: int, n_text: int) -> dict[str, Any]:
        """``pmod flops`` of one request (LM head on every prefill token, as ``pmod flops`` counts it): routed
        and dense TFLOPs and KV bytes; a dense model's routed numbers are its dense ones."""
        key = (n_vision, n_text)
        if key not in self._cache:
            report = estimate(self.config, self.method_config, n_vision=n_vision, n_text=n_text, dtype=self.dtype)
            routed = self.method_config is not None
            self._cache[key] = {
                "prefill_tflops": (report.routed_flops if routed else report.dense_flops) / 1e12,
                "dense_prefill_tflops": report.dense_flops / 1e12,
                "analytic_kv_bytes": report.routed_kv_bytes if routed else report.dense_kv_bytes,
                "dense_kv_bytes": report.dense_kv_bytes,
            }
        return self._cache[key]


def token_counts(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int | None) -> list[tuple]:
    """(vision, text) real tokens of each row."""
    real = attention_mask.bool()
    vision = ((input_ids == image_token_id) & real).sum(1) if image_token_id is not None else real.sum(1) * 0
    return [(int(v), int(r) - int(v)) for v, r in zip(vision.tolist(), real.sum(1).tolist())]


def row_kv_bytes(cache: Any, attention_mask: torch.Tensor) -> list[int]:
    """Bytes of K/V each row holds in ``cache`` (after prefill): per routed layer its valid slots, per dense layer
    its real (non-padding) tokens, times the layer's bytes per token."""
    from pmod.core.cache import RoutedCache, kv_cache_bytes

    size = kv_cache_bytes(cache)
    rows = attention_mask.shape[0]
    real = attention_mask.sum(1).tolist()
    out = [0] * rows
    for i, slots in enumerate(size.layer_slots):
        if not slots:
            continue
        per_token = size.layer_bytes[i] // (rows * slots)
        valid = cache.slot_mask(i) if isinstance(cache, RoutedCache) else None
        tokens = real if valid is None else valid.sum(1).tolist()
        out = [o + int(t) * per_token for o, t in zip(out, tokens)]
    return out


class CostLog:
    """Appends :class:`RequestCost` lines to ``<folder>/requests.rank<rank>.jsonl`` (started empty)."""

    def __init__(self, folder: str | Path, rank: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"requests.rank{rank}.jsonl"
        self.path.write_text("")
        self.rank = rank
        self.batches = 0

    def next_batch(self) -> str:
        self.batches += 1
        return f"{self.rank}-{self.batches}"

    def write(self, costs: Iterable[RequestCost]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            for cost in costs:
                f.write(json.dumps(asdict(cost)) + "\n")


def read_costs(folder: str | Path) -> list[dict[str, Any]]:
    """Every request line of every process under ``folder``."""
    records = []
    for path in sorted(Path(folder).glob("requests.rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per task: requests, tokens, summed TFLOPs and KV bytes (the model's and a dense model's for the same
    tokens), prefill seconds summed over batches, the median prefill ms per request (a batch's time shared by its
    rows) with its :func:`spread` over the batches (``prefill_ms_spread``) and the decode speed (generated tokens
    over decode seconds)."""
    out: dict[str, dict[str, Any]] = {}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    for task, rows in sorted(by_task.items()):
        batches = {r["batch"]: r for r in rows}  # one latency per batch
        decode = [b for b in batches.values() if b["decode_tokens_per_s"]]
        decoded = {b: 0 for b in batches}  # tokens after each row's first (that one comes from the prefill)
        for r in rows:
            decoded[r["batch"]] += max(r["n_generated"] - 1, 0)
        decode_s = sum(decoded[b["batch"]] / b["decode_tokens_per_s"] for b in decode)
        out[task] = {
            "requests": len(rows),
            "vision_tokens": sum(r["n_vision"] for r in rows),
            "text_tokens": sum(r["n_text"] for r in rows),
            "generated_tokens": sum(r["n_generated"] for r in rows),
            "prefill_tflops": sum(r["prefill_tflops"] for r in rows),
            "dense_prefill_tflops": sum(r["dense_prefill_tflops"] for r in rows),
            "kv_bytes": sum(r["kv_bytes"] for r in rows),
            "analytic_kv_bytes": sum(r["analytic_kv_bytes"] for r in rows),
            "dense_kv_bytes": sum(r["dense_kv_bytes"] for r in rows),
            "prefill_seconds": sum(b["prefill_ms"] for b in batches.values()) / 1000,
            "prefill_ms_per_request": statistics.median(b["prefill_ms"] / b["rows"] for b in batches.values()),
            # one timing per batch: its spread is the timing noise plus the spread of the requests' sizes
            "prefill_ms_spread": spread([b["prefill_ms"] / b["rows"] for b in batches.values()]),
            "decode_tokens_per_s": (sum(decoded[b["batch"]] for b in decode) / decode_s) if decode_s else None,
        }
    return out


def spread(values: list[float]) -> dict[str, float | int]:
    """``n``, ``min``, ``q1``, ``median``, ``q3``, ``max`` of ``values`` (quartiles interpolated linearly between
    the sorted values, as numpy's default; one value is all of them)."""
    ordered = sorted(values)
    if len(ordered) == 1:
        q1 = median = q3 = ordered[0]
    else:
        q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return {"n": len(ordered), "min": ordered[0], "q1": q1, "median": median, "q3": q3, "max": ordered[-1]}


def per_document_ms(records: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """(task, doc id) -> prefill ms of its requests (a batch's time shared by its rows), summed over them (a
    multiple-choice document asks one request per option)."""
    out: dict[tuple[str, int], float] = {}
    for r in records:
        key = (r["task"], r["doc_id"])
        out[key] = out.get(key, 0.0) + r["prefill_ms"] / r["rows"]
    return out


class PrefillClock:
    """Times a ``generate`` call's prefill: ``generate`` calls this logits processor first right after the prefill
    forward, where it also reads the cache (``on_prefill``); later calls only count decode steps."""

    def __init__(self, on_prefill: Any = None) -> None:
        self.on_prefill = on_prefill
        self.start = self.first = self.resumed = 0.0
        self.calls = 0

    def begin(self) -> None:
        _synchronize()
        self.start, self.calls = time.perf_counter(), 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls == 0:
            _synchronize()
            self.first = time.perf_counter()
            if self.on_prefill is not None:
                self.on_prefill()
            self.resumed = time.perf_counter()  # decode time starts after reading the cache
        self.calls += 1
        return scores

    @property
    def prefill_ms(self) -> float:
        return (self.first - self.start) * 1000


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
