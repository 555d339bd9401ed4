"""End-to-end p-MoD on a tiny random LLaVA model: convert, inspect routing, generate, measure the KV cache, save
and reload. Runs in seconds on a CPU with nothing to download.

    python examples/quickstart.py
"""

import tempfile

import torch

import pmod
from pmod.core.cache import cache_of  # out.cache from transformers 5.24, out.past_key_values before
from pmod.testing import llava_batch, randomize_routers, tiny_llava

torch.manual_seed(0)
model = tiny_llava(num_layers=12)  # CLIP tower + MLP projector + 12-layer Llama; 64 vision tokens per image
dense = tiny_llava(num_layers=12)
model = pmod.convert(model)  # paper defaults: PRD schedule, TanhNorm, STRing
randomize_routers(model, scale=3.0)  # stand-in for trained routers

ratios = pmod.layer_ratios(model)
print("retention per layer:", ["dense" if r is None else f"{r:.2f}" for r in ratios])

batch = llava_batch(model, text=[(4, 8), (2, 3)], images=[True, True], padding_side="left")
with pmod.record_routing(model) as rec, torch.no_grad():
    out = model(**batch, use_cache=True)
    dense_out = dense(**batch, use_cache=True)
for layer, masks in rec.processed.items():
    print(f"layer {layer:2d} processed tokens per row: {masks[0].sum(1).tolist()}")

size, dense_size = pmod.kv_cache_bytes(cache_of(out)), pmod.kv_cache_bytes(cache_of(dense_out))
print(
    f"KV cache after prefill: p-MoD {size.total_bytes} B vs dense {dense_size.total_bytes} B "
    f"({size.total_bytes / dense_size.total_bytes:.1%})"
)

with torch.no_grad():
    cached = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0)
    recomputed = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
print("generated:", cached[:, -8:].tolist())
assert torch.equal(cached, recomputed), "cached decoding must match recomputation"

with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    reloaded = pmod.load(folder)
    with torch.no_grad():
        same = torch.equal(reloaded(**batch).logits, out.logits)
print("reloaded model gives identical logits:", same)
assert same
