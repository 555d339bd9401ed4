"""The compacted p-MoD computation against the independent dense reference of ``pmod.testing``."""

import copy

import pytest
import torch

import pmod
from pmod import PModConfig
from pmod.testing import randomize_routers, tiny_llama
from pmod.testing import routed_batch as make_batch
from pmod.testing.reference import reference_forward

ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (6, 17, False)]  # unequal vision counts, a row without


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ratios", [[None, 0.9, 0.5, 0.25, 0.15, 0.5], [None, None, 0.7, 0.7, 1.0, 0.3]])
def test_compacted_equals_dense_reference(padding_side, attn, ratios):
    dense = tiny_llama(num_layers=6, attn_implementation=attn)
    model = pmod.convert(copy.deepcopy(dense), PModConfig(schedule="explicit", ratios=ratios))
    randomize_routers(model, scale=3.0)
    ids, am, vm = make_batch(ROWS, padding_side)
    routers = {i: layer.router for i, layer in pmod.routed_layers(model).items()}
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_forward(dense, routers, ratios, ids, am, vm, pmod.get_method_config(model))
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def test_string_off_reference_and_int_masks():
    ratios = [None, 0.5, 0.3]
    cfg = PModConfig(schedule="explicit", ratios=ratios, string=False)
    dense = tiny_llama(num_layers=3)
    model = pmod.convert(copy.deepcopy(dense), cfg)
    randomize_routers(model, scale=3.0)
    ids, am, vm = make_batch(ROWS, "left", seed=3)
    routers = {i: layer.router for i, layer in pmod.routed_layers(model).items()}
    with torch.no_grad():
        got_int = model(input_ids=ids, attention_mask=am, vision_mask=vm.long()).logits
        got_bool = model(input_ids=ids, attention_mask=am.bool(), vision_mask=vm).logits
        want = reference_forward(dense, routers, ratios, ids, am, vm, cfg)
    real = am.bool()
    torch.testing.assert_close(got_int[real], want[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got_bool, got_int)


def test_equal_kept_counts_and_no_padding():
    # Every row keeps the same number of vision tokens (the reference implementation crashes here).
    dense = tiny_llama(num_layers=3)
    ratios = [None, 0.5, 0.25]
    model = pmod.convert(copy.deepcopy(dense), PModConfig(schedule="explicit", ratios=ratios))
    randomize_routers(model)
    ids, am, vm = make_batch([(6, 16, True), (6, 16, True), (6, 16, False)], "right", seed=1)
    routers = {i: layer.router for i, layer in pmod.routed_layers(model).items()}
    with pmod.record_routing(model) as rec, torch.no_grad():
        out = model(input_ids=ids, attention_mask=am, vision_mask=vm, output_hidden_states=True)
    want = reference_forward(dense, routers, ratios, ids, am, vm, PModConfig())
    torch.testing.assert_close(out.logits, want, atol=2e-5, rtol=1e-4)
    assert rec.processed[1][0].sum(1).tolist() == [6 + 8] * 3
    assert rec.processed[2][0].sum(1).tolist() == [6 + 4] * 3
    # Text tokens are always processed; the weights are the TanhNorm 0.2 tanh(logit) + 1 of the router logits on
    # the layer's input.
    assert bool(rec.processed[2][0][~vm].all())
    for i, router in routers.items():
        with torch.no_grad():
            tanh_norm = 0.2 * torch.tanh(router(out.hidden_states[i]).squeeze(-1)) + 1
        torch.testing.assert_close(rec.weights[i][0], tanh_norm, atol=1e-6, rtol=0)


def test_ties_break_by_lower_position():
    # A zero router gives every vision token the same logit: the first k vision tokens are kept.
    model = pmod.convert(tiny_llama(num_layers=2), PModConfig(schedule="explicit", ratios=[None, 0.5]))
    ids, am, vm = make_batch([(3, 10, False)], "right")
    with pmod.record_routing(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm)
    kept = (rec.processed[1][0] & vm)[0].nonzero().flatten().tolist()
    assert kept == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("string", [True, False])
def test_router_gradient_paths(string):
    model = pmod.convert(tiny_llama(num_layers=2), PModConfig(schedule="explicit", ratios=[None, 0.5], string=string))
    randomize_routers(model)
    ids, am, vm = make_batch([(4, 12, False), (4, 8, True)], "right")
    router = model.model.layers[1].router
    with pmod.record_routing(model) as rec:
        out = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    processed = rec.processed[1][0]
    grads = {}
    for name, select in {"processed": processed & vm, "skipped": vm & ~processed}.items():
        model.zero_grad()
        out[select].pow(2).sum().backward(retain_graph=True)
        grads[name] = router.weight.grad.abs().sum().item()
    assert grads["processed"] > 0
    assert (grads["skipped"] > 0) == string


def test_routed_attention_runs_without_cudnn_and_keeps_the_users_backends():
    # cuDNN sdpa builds a plan per sequence length; routed layers (one cache length each) must not use it.
    model = pmod.convert(tiny_llama(num_layers=3), PModConfig(schedule="explicit", ratios=[None, 0.5, 0.5]))
    seen = {}

    def hook(name):
        def record(module, args, kwargs):
            seen[name] = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())

        return record

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
    ids, am, vm = make_batch([(4, 8, False)], "right")
    flash = torch.backends.cuda.flash_sdp_enabled()
    try:
        torch.backends.cuda.enable_flash_sdp(False)  # a user's own choice, which routed layers keep
        with torch.no_grad():
            model(input_ids=ids, attention_mask=am, vision_mask=vm)
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
    assert seen[0] == (True, False)  # the dense layer 0 is untouched
    assert seen[1] == seen[2] == (False, False)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the layer
