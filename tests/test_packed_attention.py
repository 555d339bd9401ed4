"""The packed (padding-free) prefill of routed layers against the padded path and the independent references.

On the CPU the packed path attends with one sdpa call per row (CUDA's varlen flash kernel is checked by
``benchmarks/gpu_check.py``); everything else of the path — packing the compacted slots, positions, the cache
written in the padded slot layout, the scatter back — is the same code on both devices.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pmod
from pmod import PModConfig
from pmod.core.packed_attention import cumulative_lengths, packed_causal_attention
from pmod.testing import IMAGE_TOKEN_ID, llava_next_batch, randomize_routers, tiny_llama, tiny_llava_next
from pmod.testing import routed_batch as make_batch
from pmod.testing.multimodal import IMAGE_ID, START_ID, VIDEO_ID, qwen_vl_batch, tiny_qwen_vl
from pmod.testing.reference import (
    capture_decoder_inputs,
    reference_decoder_logits,
    reference_forward,
    reference_rules,
)

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (6, 17, False)]  # unequal counts, a text-only row
RATIOS = [None, 0.9, 0.5, 0.25, 0.15, 0.5]
GEN = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def routed_llama(method: pmod.MethodConfig | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=6)
    model = pmod.convert(copy.deepcopy(dense), method or PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    return dense, model




@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_packed_equals_padded_and_the_reference(padding_side: str, packed_calls: list[int]) -> None:
    dense, model = routed_llama()
    ids, am, vm = make_batch(ROWS, padding_side)
    routers = {i: layer.router for i, layer in pmod.routed_layers(model).items()}
    with torch.no_grad():
        padded = pmod.set_attention_path(model, "padded")(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        assert packed_calls[0] == 0
        packed = pmod.set_attention_path(model, "packed")(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_forward(dense, routers, RATIOS, ids, am, vm, pmod.get_method_config(model))
    assert packed_calls[0] == 5  # every routed layer packed its unequal rows
    real = am.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[real], want[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["mod", "gamma_mod", "fastv"])
def test_other_methods_packed_equal_padded(method: str) -> None:
    config = {
        "mod": pmod.MoDConfig(layers=[1, 2, 3, 4]),
        "gamma_mod": pmod.GammaMoDConfig(layers=[1, 2, 4], skip_ratio=0.5),
        "fastv": pmod.FastVConfig(layer=2, keep=0.5),
    }[method]
    _, model = routed_llama(config)
    ids, am, vm = make_batch(ROWS, "left", seed=1)
    with torch.no_grad():
        padded = pmod.set_attention_path(model, "padded")(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        packed = pmod.set_attention_path(model, "packed")(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    real = am.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)


def test_generation_after_a_packed_prefill_equals_recomputation(packed_calls: list[int]) -> None:
    """The packed prefill writes the layer caches in the padded slot layout the decode steps read (LLaVA-NeXT
    rows of unequal image sizes and a text-only row)."""
    model = pmod.convert(tiny_llava_next(num_layers=8))
    randomize_routers(model, scale=3.0)
    batch = llava_next_batch(model, [(3, 5), (2, 2), (6, 1), (4, 4)], [(16, 32), (32, 32), None, (32, 16)], "left")
    gen = dict(GEN, suppress_tokens=[IMAGE_TOKEN_ID], output_logits=True, return_dict_in_generate=True)
    pmod.set_attention_path(model, "packed")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=12, **gen)
        assert packed_calls[0] == 6  # the prefill of the 6 routed layers; decode steps run padded over the cache
        full = model.generate(**batch, max_new_tokens=12, use_cache=False, **gen)
        padded = pmod.set_attention_path(model, "padded").generate(**batch, max_new_tokens=12, **gen)
    assert torch.equal(out.sequences, full.sequences)
    assert torch.equal(out.sequences, padded.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(full.logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(padded.logits), atol=1e-5, rtol=0)


def test_packed_gradients_equal_padded() -> None:
    _, model = routed_llama()
    ids, am, vm = make_batch(ROWS, "right", seed=4)
    grads = {}
    for path in ("padded", "packed"):
        model.zero_grad()
        pmod.set_attention_path(model, path)
        logits = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        (logits[am.bool()].float().pow(2).mean()).backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("router" in n for n in grads["packed"])
    for name, grad in grads["padded"].items():
        torch.testing.assert_close(grads["packed"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_m_rope_backbones_packed_equal_the_reference(family: str, packed_calls: list[int]) -> None:
    """M-RoPE cos/sin and 3-axis position ids are packed per axis; Qwen3-VL's deepstack layers stay dense."""
    dense = tiny_qwen_vl(family, num_layers=6)
    model = pmod.convert(copy.deepcopy(dense), PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    rows = [(3, [("image", (4, 4))], 2), (2, [("image", (4, 6)), ("image", (2, 2))], 3), (4, [("video", (4, 4, 4))], 1)]
    batch = qwen_vl_batch(model, rows)
    decoder = pmod.core.backbone.backbone_for(dense).decoder(dense)
    captured = capture_decoder_inputs(dense, decoder, **batch)
    real = batch["attention_mask"].bool()
    vision = ((batch["input_ids"] == IMAGE_ID) | (batch["input_ids"] == VIDEO_ID)) & real
    pmod.set_attention_path(model, "packed")
    with torch.no_grad():
        got = model(**batch).logits
        want = reference_decoder_logits(dense, decoder, reference_rules(model), captured, real, vision)
        generated = model.generate(**batch, max_new_tokens=8, suppress_tokens=[IMAGE_ID, VIDEO_ID, START_ID], **GEN)
        recomputed = model.generate(**batch, max_new_tokens=8, use_cache=False,
                                    suppress_tokens=[IMAGE_ID, VIDEO_ID, START_ID], **GEN)  # fmt: skip
    assert packed_calls[0] > 0
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert torch.equal(generated, recomputed)


def test_packed_causal_attention_is_per_row_causal_attention() -> None:
    """Hand-made rows of 3, 1 and 5 tokens with grouped-query heads, against one masked attention per row."""
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    n = int(valid.sum())
    q = torch.randn(1, 4, n, 8, generator=g)
    k, v = torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    cu = cumulative_lengths(valid)
    assert cu.tolist() == [0, 3, 4, 9]
    got = packed_causal_attention(q, k, v, cu, 5)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        kk, vv = k[0, :, a:b].repeat_interleave(2, 0), v[0, :, a:b].repeat_interleave(2, 0)
        scores = q[0, :, a:b] @ kk.transpose(-1, -2) / 8**0.5
        scores = scores.masked_fill(torch.ones(b - a, b - a).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(got[0, :, a:b], scores.softmax(-1) @ vv, atol=1e-6, rtol=1e-5)


def test_attention_path_mistakes(packed_calls: list[int]) -> None:
    _, model = routed_llama()
    with pytest.raises(ValueError, match="not one of auto, padded, packed"):
        pmod.set_attention_path(model, "varlen")
    eager = pmod.convert(tiny_llama(num_layers=3, attn_implementation="eager"), PModConfig(schedule="constant"))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        pmod.set_attention_path(eager, "packed")
    # auto on the CPU keeps the padded path (no varlen kernel): the layers never pack
    pmod.set_attention_path(model, "auto")
    ids, am, vm = make_batch(ROWS, "left")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    assert packed_calls[0] == 0
