"""Decode without copies and compiled forwards (issue 22): the static p-MoD cache from ``generate``, written in place,
and ``torch.compile(fullgraph=True)`` of a prefill at fixed shapes and of decode steps, each against eager runs.

On the CPU ``aot_eager`` is the backend: it traces the whole forward as torch.compile does (a graph break fails
``fullgraph=True``) without a C++ compiler; CUDA graphs themselves need a GPU (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import pmod
from pmod import DARTConfig, FastVConfig, GammaMoDConfig, PDropConfig, PModConfig
from pmod.core.cache import RoutedStaticCache, cache_kwargs, cache_of
from pmod.testing import llava_batch, randomize_routers, routed_batch, tiny_llama, tiny_llava

CONFIGS = {
    "pmod": PModConfig(),
    "fastv": FastVConfig(layer=2, keep=0.5),
    "gamma_mod": GammaMoDConfig(layers=[2, 4, 6], skip_ratio=0.5),
    "pdrop": PDropConfig(layers=[2, 4, 6], keep=0.5),
    "dart": DARTConfig(layer=2, keep=0.5),
}
#: Three rows, left-padded, of unequal text and image use: unequal kept counts in every routed layer.
ROWS, IMAGES = [(5, 6), (2, 9), (7, 1)], [True, False, True]


def routed_llava(method: str) -> torch.nn.Module:
    model = pmod.convert(tiny_llava(num_layers=8), copy.deepcopy(CONFIGS[method]))
    randomize_routers(model, scale=3.0)
    return model.eval()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_static_cache_generation_equals_recomputation(method: str) -> None:
    """``generate(cache_implementation="static")`` on a routed LLaVA gives the tokens and logits of the dynamic cache
    (and, for p-MoD, of generation without a cache, every step recomputed: FastV's ranking by the last token and
    gamma-MoD's decode rule make a recomputed step differ by design), with padding and rows of unequal kept counts;
    each routed layer's static record marks exactly the slots the dynamic cache holds as real, the rest unwritten."""
    model = routed_llava(method)
    image = model.config.image_token_id
    batch = llava_batch(model, ROWS, IMAGES, padding_side="left", seed=5)
    gen = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[image], output_logits=True,
               return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        static = model.generate(**batch, cache_implementation="static", **gen)
        dynamic = model.generate(**batch, **gen)
        full = model.generate(**batch, use_cache=False, **gen)
    cache = cache_of(static)
    assert isinstance(cache, RoutedStaticCache)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(dynamic.logits), atol=1e-5, rtol=0)
    if method == "pmod":
        assert torch.equal(static.sequences, full.sequences)
        torch.testing.assert_close(torch.stack(static.logits), torch.stack(full.logits), atol=1e-5, rtol=0)
    dyn = cache_of(dynamic)
    for i in pmod.routed_layers(model):
        real = dyn.slot_mask(i)
        record = cache.slot_mask(i)
        if real is None:  # a layer that cached every token of every row
            real = torch.ones(record.shape[0], dyn.layers[i].keys.shape[-2], dtype=torch.bool)
        # The dynamic cache's last step is not cached yet when generate stops: compare what both hold.
        written = int(cache.layers[i].cumulative_length)
        assert torch.equal(record[:, : real.shape[1]], real), i
        assert written == real.shape[1] and not record[:, written:].any(), i


def test_static_decode_writes_in_place() -> None:
    """Decode steps over the static cache keep every buffer where it is (K/V and the slot records: what CUDA graphs
    need) and give the dynamic cache's logits."""
    model = routed_llava("pmod")
    batch = llava_batch(model, ROWS, IMAGES, padding_side="left", seed=5)
    from transformers import StaticCache

    static = StaticCache(config=model.config.get_text_config(), max_cache_len=batch["input_ids"].shape[1] + 4)
    with torch.no_grad():
        out = model(**batch, **cache_kwargs(static), use_cache=True)
        dynamic = cache_of(model(**batch, use_cache=True))
        buffers = [t.data_ptr() for layer in static.layers for t in (layer.keys, layer.values)]
        records = [r.data_ptr() for r in static._records().values()]
        token, mask = out.logits[:, -1:].argmax(-1), batch["attention_mask"]
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            step = dict(input_ids=token, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        use_cache=True)  # fmt: skip
            got = model(**step, **cache_kwargs(static)).logits
            want = model(**step, **cache_kwargs(dynamic)).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            token = want[:, -1:].argmax(-1)
    assert [t.data_ptr() for layer in static.layers for t in (layer.keys, layer.values)] == buffers
    assert [r.data_ptr() for r in static._records().values()] == records


def counting_backend(graphs: list) -> object:
    """A torch.compile backend that runs the traced graph as is (like ``eager``) and keeps every graph it gets."""

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    return backend


def routed_llama() -> torch.nn.Module:
    model = pmod.convert(tiny_llama(num_layers=4), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.25, 0.5]))
    randomize_routers(model, scale=3.0)
    return model.eval()


def test_prefill_compiles_without_graph_breaks_given_the_counts() -> None:
    """``torch.compile(fullgraph=True)`` of a p-MoD prefill at fixed shapes (left padding, unequal kept rows) traces
    one graph and gives eager's logits when the caller passes the per-row counts; without them the plan's one host
    read of the counts is a graph break, which ``fullgraph=True`` refuses."""
    model = routed_llama()
    ids, am, vm = routed_batch([(5, 8, False), (3, 4, False)], "left")
    counts = dict(vision_counts=vm.sum(1).tolist(), real_counts=am.sum(1).tolist())
    graphs: list = []
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False).logits
        got = compiled(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False, **counts).logits
        assert len(graphs) == 2  # pmod's forward pre-hook and the model's forward, each one whole graph
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        torch._dynamo.reset()
        with pytest.raises(torch._dynamo.exc.Unsupported):
            torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=am, vision_mask=vm)


def test_static_decode_compiles_once_without_graph_breaks() -> None:
    """The decode step over the static cache compiles with ``fullgraph=True`` once and is reused at every later step
    (nothing in it changes shape or guards on a step number), with eager's logits at each step."""
    model = routed_llama()
    ids, am, vm = routed_batch([(5, 8, False), (3, 4, False)], "left")
    from transformers import StaticCache

    caches = [StaticCache(config=model.config, max_cache_len=ids.shape[1] + 5) for _ in range(2)]
    graphs: list = []
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=counting_backend(graphs))
    with torch.no_grad():
        for cache in caches:
            out = model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(cache), use_cache=True)
        token, mask = out.logits[:, -1:].argmax(-1), am
        for step_number in range(4):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            # generate's compiled decode gets a fixed-size mask; here the 2-D mask grows, so mark it dynamic.
            torch._dynamo.mark_dynamic(mask, 1)
            step = dict(input_ids=token, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1,
                        use_cache=True)  # fmt: skip
            want = model(**step, **cache_kwargs(caches[0])).logits
            got = compiled(**step, **cache_kwargs(caches[1])).logits
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            token = want[:, -1:].argmax(-1)
            if step_number == 0:
                first = len(graphs)  # the pre-hook's and the forward's graphs
    assert first == 2 and len(graphs) == first


def test_a_reused_static_cache_is_emptied_in_place() -> None:
    """A static cache used for a second prompt after ``reset()`` (as ``generate`` reuses one of the same size) gives
    that prompt's own results and keeps its slot records where they were (compiled decode steps captured them)."""
    model = routed_llava("pmod")
    from transformers import StaticCache

    first = llava_batch(model, ROWS, IMAGES, padding_side="left", seed=5)
    second = llava_batch(model, ROWS, [False, True, True], padding_side="left", seed=6)
    width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
    static = StaticCache(config=model.config.get_text_config(), max_cache_len=width + 2)
    with torch.no_grad():
        model(**first, **cache_kwargs(static), use_cache=True)
        records = {i: r.data_ptr() for i, r in static._records().items()}
        static.reset()
        got = model(**second, **cache_kwargs(static), use_cache=True).logits
        want = model(**second, use_cache=True).logits
        fresh = StaticCache(config=model.config.get_text_config(), max_cache_len=width + 2)
        model(**second, **cache_kwargs(fresh), use_cache=True)
    real = second["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)
    assert {i: r.data_ptr() for i, r in static._records().items()} == records
    for i in records:
        assert torch.equal(static.slot_mask(i), fresh.slot_mask(i)), i
