"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.methods`` (see
``benchmarks/mutation/run_mutation.py``). Expected values are worked out by hand in the comments, never read back
from the code under test."""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
from torch import nn
from transformers import LlamaModel

import pmod
from pmod import GammaMoDConfig
from pmod.core.compat import rotary
from pmod.core.routed_layer import RoutingInputs
from pmod.methods import gamma_arank
from pmod.methods.gamma_arank import attention_rank, layer_aranks, query_key
from pmod.methods.gamma_mod import choose_layers, read_arank_file
from pmod.methods.gamma_router import question_tokens, routing_loss
from pmod.methods.vision_router import Router
from pmod.testing import enable_activation_checkpointing, randomize_routers, routed_batch, tiny_llama
from pmod.testing.reference import reference_logits, reference_rules


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, section):  # noqa: ANN001, ANN201 - stands in for Qwen2-VL's
    return ("multimodal", q, k, cos, sin, section)


class NoRopeAttention(nn.Module):
    """An attention module whose modeling file (this test file) has no ``apply_rotary_pos_emb``."""

    def __init__(self, **config: dict | None) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(**config)


def test_rotary_falls_back_to_m_rope_and_names_a_module_without_rope() -> None:
    # This file has apply_multimodal_rotary_pos_emb and no apply_rotary_pos_emb: the M-RoPE function is used when
    # the config names an mrope_section (rope_parameters, or rope_scaling before transformers 5), bound to it.
    fn = rotary(NoRopeAttention(rope_parameters={"mrope_section": [1, 2, 1]}, rope_scaling=None))
    assert fn(1, 2, 3, 4) == ("multimodal", 1, 2, 3, 4, [1, 2, 1])
    old = NoRopeAttention(rope_parameters=None, rope_scaling={"mrope_section": [3]})
    assert rotary(old)(1, 2, 3, 4) == ("multimodal", 1, 2, 3, 4, [3])
    older = NoRopeAttention(rope_scaling={"mrope_section": [3]})  # a config from before rope_parameters existed
    assert rotary(older)(1, 2, 3, 4) == ("multimodal", 1, 2, 3, 4, [3])
    for module in (NoRopeAttention(rope_parameters={}), NoRopeAttention(rope_parameters=None), NoRopeAttention(),
                   nn.Identity()):  # fmt: skip
        with pytest.raises(TypeError, match=f"{type(module).__name__} has no apply_rotary_pos_emb in its module"):
            rotary(module)


def one_head(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1)  # [H=1, n, d=1]


def test_softmax_arank_by_hand() -> None:
    # q = (0, 1, 0), k = (0, 10, 0), scaling 1: causal softmax rows, diagonal zeroed:
    #   row 0: [0, 0, 0]; row 1: logits (0, 10) -> [sigmoid(-10) = 4.54e-5, 0, 0]; row 2: logits 0 -> [1/3, 1/3, 0].
    # Singular values ~0.471 and ~0.707 * 4.54e-5 = 3.2e-5, above matrix_rank's tolerance 0.471 * 3 * 1.19e-7:
    # rank 2. Scaling 2 makes row 1 sigmoid(-20) = 2.1e-9, below the tolerance: rank 1.
    q, k = one_head([0.0, 1.0, 0.0]), one_head([0.0, 10.0, 0.0])
    assert attention_rank(q, k, "softmax") == 2.0
    assert attention_rank(q, k, "softmax", scaling=2.0) == 1.0
    # Rows, not columns, are normalised: q = (0, 20, 0), k = (1, 1, 0) gives rows [0, 0, 0], [1/2, 0, 0] and
    # [1/3, 1/3, 0] (rank 2); a column softmax would leave [1, 0, 0] and [2e-9, 2e-9, 0] (rank 1).
    assert attention_rank(one_head([0.0, 20.0, 0.0]), one_head([1.0, 1.0, 0.0]), "softmax") == 2.0
    # The paper's measure: q k^T of 1-dim q and k has rank 1.
    assert attention_rank(q, k) == 1.0
    with pytest.raises(ValueError, match="Unknown ARank variant 'other'"):
        attention_rank(q, k, "other")


def test_query_key_repeats_each_kv_head_for_its_query_heads() -> None:
    model = tiny_llama(num_layers=2)
    attn = model.model.layers[0].self_attn
    cfg = model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # grouped-query attention: the repeat matters
    normed = torch.randn(1, 5, cfg.hidden_size)
    cos, sin = model.model.rotary_emb(normed, torch.arange(5)[None])
    q, k = query_key(attn, normed, (cos, sin))
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    assert q.shape == k.shape == (1, cfg.num_attention_heads, 5, attn.head_dim)
    torch.testing.assert_close(k[:, 0], k[:, group - 1], rtol=0, atol=0)


def test_layer_aranks_drop_padding_and_default_to_the_papers_measure() -> None:
    model = tiny_llama(num_layers=2, attn_implementation="eager").eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (1, 3))
    # Row 0 alone: 3 real tokens. Padded to 6 on the left, the padding must not count: the same ranks.
    alone = layer_aranks(model, [{"input_ids": ids}])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with_padding = layer_aranks(model, [{"input_ids": padded, "attention_mask": mask}])
    assert alone == with_padding == [3.0, 3.0]  # 3 tokens: a 3 x 3 q k^T of full rank (head_dim > 3)
    assert layer_aranks(model, [{"input_ids": ids}], "softmax") == [2.0, 2.0]  # n - 1 for a causal softmax


def test_layer_aranks_measure_with_the_layers_attention_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    # The softmax variant scales q k^T as the layer does: 1/sqrt(head_dim) = 1/sqrt(16) = 0.25 in tiny_llama (a
    # scale changes the softmax's ranks only through underflow, see test_softmax_arank_by_hand, so it is read here).
    model = tiny_llama(num_layers=2, attn_implementation="eager").eval()
    seen: list[float] = []

    def measured(q, k, variant="scores", scaling=1.0):  # noqa: ANN001, ANN202
        seen.append(scaling)
        return attention_rank(q, k, variant, scaling)

    monkeypatch.setattr(gamma_arank, "attention_rank", measured)
    assert layer_aranks(model, [{"input_ids": torch.tensor([[5, 6, 7]])}], "softmax") == [2.0, 2.0]
    assert seen == [0.25, 0.25]


def test_choose_layers_default_is_the_fourth_largest() -> None:
    # Values 9, 8, 7, 6, 5, 1: the 4th largest is 6, so layers with 5 and 1 route (layer 0 never does).
    assert choose_layers([9.0, 8.0, 7.0, 6.0, 5.0, 1.0]) == [4, 5]


def test_arank_file_forms(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"arank": [3, 2.5]}))
    (tmp_path / "b.json").write_text(json.dumps([1, 2]))
    (tmp_path / "c.json").write_text(json.dumps({"arank": [1, "x"]}))
    (tmp_path / "d.json").write_text(json.dumps({"arank": 5}))
    assert read_arank_file(str(tmp_path / "a.json")) == [3.0, 2.5]
    assert read_arank_file(str(tmp_path / "b.json")) == [1.0, 2.0]
    for bad in ("c.json", "d.json"):
        with pytest.raises(ValueError, match="holds no list of per-layer ARank values"):
            read_arank_file(str(tmp_path / bad))


def test_resolved_config_keeps_the_arank_values_of_a_file(tmp_path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"arank": [9, 8, 7, 6, 5, 1]}))
    cfg = GammaMoDConfig(arank_file=str(tmp_path / "a.json")).resolved(6)
    assert (cfg.layers, cfg.arank) == ([4, 5], [9.0, 8.0, 7.0, 6.0, 5.0, 1.0])


def test_resolved_config_keeps_the_arank_values() -> None:
    cfg = GammaMoDConfig(arank=[9.0, 8.0, 7.0, 6.0, 5.0, 1.0]).resolved(6)
    assert (cfg.layers, cfg.arank) == ([4, 5], [9.0, 8.0, 7.0, 6.0, 5.0, 1.0])
    assert GammaMoDConfig(arank=[9.0, 8.0, 7.0, 6.0, 5.0, 1.0]).mod_layers(6) == [4, 5]


def zero_router_model(**settings) -> nn.Module:
    model = pmod.convert(tiny_llama(num_layers=3), GammaMoDConfig(layers=[1, 2], **settings))
    with torch.no_grad():
        model.model.gamma_mod_router.weight.zero_()
        model.model.gamma_mod_router.bias.zero_()  # p = softmax(0, 0)[1] = 0.5 exactly
    return model.eval()


def test_thresholds_at_p_equal_to_the_threshold() -> None:
    # Decode: p >= 0.5 is processed. Prefill by threshold: p > 0.5 is processed, p = 0.5 is not.
    model = zero_router_model(prefill_rule="threshold", prefill_threshold=0.5)
    layer = model.model.layers[1]
    hidden = torch.randn(2, 1, model.config.hidden_size)
    with torch.no_grad():
        decode = layer.routing_rule.route(layer, hidden, RoutingInputs())
        assert decode.processed.tolist() == [[True], [True]]
        vision = torch.tensor([[False, True, True]])
        prefill = layer.routing_rule.route(layer, torch.randn(1, 3, model.config.hidden_size),
                                           RoutingInputs(vision_mask=vision))  # fmt: skip
    assert prefill.processed.tolist() == [[True, False, False]]  # the text token is the question
    assert prefill.weights.tolist() == [[0.5, 0.5, 0.5]]


def test_gamma_mod_router_follows_the_model_dtype_and_bias_setting() -> None:
    model = pmod.convert(tiny_llama(num_layers=3).to(torch.bfloat16), GammaMoDConfig(layers=[1, 2], router_bias=False))
    router = model.model.gamma_mod_router
    assert router.weight.dtype == torch.bfloat16 and router.bias is None


def test_question_tokens_without_vision_mask_are_the_text() -> None:
    real = torch.tensor([[True, True, False]])
    assert question_tokens(RoutingInputs(), real, 3).tolist() == [[True, True, False]]
    assert question_tokens(RoutingInputs(), real, 1).tolist() == [[False, False, False]]


def test_routing_loss_of_one_routable_token() -> None:
    # One routable token with logits (0, 0) labelled kept: cross-entropy ln 2, divided by 1 routable token.
    logits = torch.zeros(1, 2, 2)
    loss = routing_loss(logits, torch.tensor([[True, False]]), torch.tensor([[True, False]]))
    assert float(loss) == pytest.approx(math.log(2))


def test_eval_forward_with_gradients_uses_the_inference_rule() -> None:
    # model.eval() with autograd on is not training: prefill_rule="threshold" applies, not training's top-k. With
    # labels on every token no token is a question token (those are the unlabelled ones), so all 6 are routable:
    # p = 0.5 is not > 0.5 and none runs (top-k would keep floor(6 * 0.5) = 3).
    model = zero_router_model(prefill_rule="threshold", prefill_threshold=0.5)
    ids = torch.randint(5, 100, (1, 6))
    vision = torch.tensor([[False, True, True, True, True, False]])
    with pmod.record_routing(model) as rec:
        out = model(input_ids=ids, vision_mask=vision, labels=ids)
    assert [p[0].sum().item() for p in rec.processed.values()] == [0, 0]
    lm = nn.functional.cross_entropy(out.logits[0, :-1].detach(), ids[0, 1:])
    assert float(out.loss.detach()) == pytest.approx(float(lm), rel=1e-6)  # no routing loss added


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: pmod.FastVConfig(keep=0.0), r"FastV keep 0.0 is outside \(0, 1\]"),
        (lambda: pmod.MoDConfig(ratio=0.0), r"MoD ratio 0.0 is outside \(0, 1\]"),
        (lambda: pmod.MoDConfig(ratio=1.5), r"MoD ratio 1.5 is outside \(0, 1\]"),
        (lambda: GammaMoDConfig(layers=[1], threshold_rank=0), "threshold_rank must be >= 1, got 0"),
    ],
)
def test_config_bounds_refused(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_config_bounds_accepted() -> None:
    # The closed ends of the ranges: keep 1.0, ratio 1.0, threshold_rank 1, skip_ratio 0.0.
    assert pmod.FastVConfig(keep=1.0).keep == 1.0
    assert pmod.MoDConfig(ratio=1.0).ratio == 1.0
    assert GammaMoDConfig(layers=[1], threshold_rank=1, skip_ratio=0.0).layer_ratios(3) == [None, 1.0, None]


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(schedule="explicit"), "schedule='explicit' needs `ratios`"),
        (dict(schedule="constant", ratio=0.0), r"Constant ratio 0.0 is outside \(0, 1\]"),
        (dict(min_ratio=0.0), r"min_ratio 0.0 is outside \(0, 1\]"),
        (dict(min_ratio=1.5, max_ratio=2.0), r"min_ratio 1.5 is outside \(0, 1\]"),
        (dict(min_ratio=0.5, max_ratio=0.5), r"max_ratio \(0.5\) must be larger than min_ratio \(0.5\)"),
    ],
)
def test_pmod_settings_refused(settings, message) -> None:
    with pytest.raises(ValueError, match=message):
        pmod.PModConfig(**settings)


def test_router_bias_setting_reaches_the_routers() -> None:
    model = pmod.convert(tiny_llama(num_layers=3), pmod.PModConfig(schedule="constant", router_bias=False))
    assert all(layer.router.bias is None for layer in pmod.routed_layers(model).values())


def test_pmod_min_ratio_reaches_the_schedule() -> None:
    # min_ratio 1.0 is allowed (with max_ratio above it); min_ratio 0.3 clamps the tail: PRD's R_31 of 32 layers is
    # 0.5 cos(pi) + 0.5 = 0, linear's 0.5 - 1 + 0.5 = 0, both clamped to 0.3.
    assert pmod.PModConfig(min_ratio=1.0, max_ratio=1.5).min_ratio == 1.0
    assert pmod.PModConfig(min_ratio=0.3).layer_ratios(32)[31] == 0.3
    assert pmod.PModConfig(schedule="linear", min_ratio=0.3).layer_ratios(32)[31] == 0.3


@pytest.mark.parametrize("bias", [False, True])
def test_router_logits_of_2d_and_3d_hidden_states(bias: bool) -> None:
    # logit = sum_d hidden[d] * w[d] (+ b): w = (1, 2, 3), b = 0.5.
    router = Router(3, 1, bias=bias)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        if bias:
            router.bias.fill_(0.5)
    hidden = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]]])
    expected = torch.tensor([[[1.0], [5.0]], [[6.0], [-1.0]]]) + (0.5 if bias else 0.0)
    assert torch.equal(router(hidden), expected)
    assert torch.equal(router(hidden[0]), expected[0])  # 2-D [T, D]: the plain Linear
    assert torch.equal(router(hidden[None]), expected[None])  # 4-D: the plain Linear too


def test_top_k_prefill_of_two_tokens_leaves_the_choice_to_the_plan_with_the_probabilities() -> None:
    # Every multi-token chunk, 2 tokens included, is a prefill: the rule gives scores p to the plan (which sizes the
    # layer from the counts, no host sync) rather than a processed mask, and records p (0.5 with a zero router).
    model = zero_router_model()
    layer = model.model.layers[1]
    for seq in (2, 3):
        with torch.no_grad():
            decision = layer.routing_rule.route(
                layer,
                torch.randn(1, seq, model.config.hidden_size),
                RoutingInputs(vision_mask=torch.ones(1, seq, dtype=torch.bool)),
            )
        assert decision.processed is None
        assert decision.scores.flatten().tolist() == [0.5] * seq
        assert decision.weights.tolist() == [[0.5] * seq]


def test_training_keeps_the_top_k_whatever_the_prefill_rule() -> None:
    # prefill_rule="threshold" is an inference rule: training keeps the top floor(4 * 0.5) = 2 of the 4 routable
    # (vision) tokens, ties (every p = 0.5) to the earlier ones; the threshold 0.4 would keep all 4.
    model = zero_router_model(prefill_rule="threshold", prefill_threshold=0.4)
    layer = model.model.layers[1].train()
    vision = torch.tensor([[False, True, True, True, True]])
    losses: list = []
    decision = layer.routing_rule.route(layer, torch.randn(1, 5, model.config.hidden_size),
                                        RoutingInputs(vision_mask=vision, routing_losses=losses))  # fmt: skip
    assert decision.processed.tolist() == [[True, True, True, False, False]]
    assert len(losses) == 1 and float(losses[0].detach()) == pytest.approx(0.01 * math.log(2))  # logits (0, 0): CE ln 2


def test_renumbered_positions_with_the_threshold_prefill_equal_the_original_codes() -> None:
    """The original evaluation code: prefill by threshold (0.4 here, so that some tokens are skipped) with the
    processed tokens at positions 0..K-1 (the reference recomputes RoPE per layer from the processed mask)."""
    dense = tiny_llama(num_layers=4, attn_implementation="eager")
    with torch.no_grad():  # peaked attention, so that positions move the output
        for block in dense.model.layers:
            block.self_attn.q_proj.weight.mul_(8.0)
            block.self_attn.k_proj.weight.mul_(8.0)
    config = GammaMoDConfig(layers=[1, 3], prefill_rule="threshold", prefill_threshold=0.4, renumber_positions=True)
    model = pmod.convert(copy.deepcopy(dense), config)
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(12, 20, False), (10, 8, True)], "right", seed=6)
    real = am.bool()
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False).logits
        rules = reference_rules(model, prefill_threshold=0.4)
        want = reference_logits(dense, rules, ids, am, vm)
        for rule in rules.values():
            rule.renumber_positions = False
        own_positions = reference_logits(dense, rules, ids, am, vm)
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    assert (got[real] - own_positions[real]).abs().max() > 1e-2  # the positions matter here
    share = [float(rec.processed[i][0][vm].float().mean()) for i in (1, 3)]
    assert all(0.1 < s < 0.9 for s in share), share  # the threshold skips some vision tokens, not all


def test_gamma_mod_routing_loss_with_activation_checkpointing() -> None:
    # Checkpointed layers run again in the backward pass with the same routing inputs: the losses they compute then
    # are not collected (the forward's hook consumed the list), and loss and gradients are the plain run's.
    model = pmod.convert(tiny_llama(num_layers=3), GammaMoDConfig(layers=[1, 2]))
    randomize_routers(model, scale=3.0)
    model.train()
    ids, am, vm = routed_batch([(6, 8, False), (5, 4, True)], "right", seed=2)
    labels = ids.masked_fill(~am.bool(), -100)

    def loss_and_router_grad(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        m.zero_grad()
        loss = m(input_ids=ids, attention_mask=am, vision_mask=vm, labels=labels).loss
        loss.backward()
        return loss.detach(), m.model.gamma_mod_router.weight.grad.clone()

    plain = loss_and_router_grad(model)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    again = loss_and_router_grad(checkpointed)
    torch.testing.assert_close(again[0], plain[0])
    torch.testing.assert_close(again[1], plain[1], atol=1e-6, rtol=1e-4)
    assert float(pmod.routing_loss(checkpointed)) > 0


def test_a_bare_decoder_collects_gamma_mods_routing_loss() -> None:
    # A model without an LM head returns no loss to add to; the hook still collects the routing loss. Zero router:
    # every routable token's cross-entropy is ln 2, so each of the 2 MoD layers adds 0.01 * ln 2.
    decoder = LlamaModel(tiny_llama(num_layers=3).config)
    pmod.convert(decoder, GammaMoDConfig(layers=[1, 2]))
    with torch.no_grad():
        decoder.gamma_mod_router.weight.zero_()
        decoder.gamma_mod_router.bias.zero_()
    vision = torch.tensor([[False, True, True, True, True, False]])
    out = decoder.train()(input_ids=torch.randint(5, 100, (1, 6)), vision_mask=vision)
    assert not hasattr(out, "loss")
    assert float(pmod.routing_loss(decoder)) == pytest.approx(0.02 * math.log(2))


def test_a_question_mask_of_zeros_and_ones_is_read_as_bool() -> None:
    # A tokenizer-style 0/1 (long) question mask routes as the bool one.
    model = pmod.convert(tiny_llama(num_layers=3), GammaMoDConfig(layers=[1, 2]))
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(6, 8, False), (5, 4, True)], "left", seed=3)
    question = (am.bool() & ~vm) & (torch.arange(ids.shape[1]) % 2 == 0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am, vision_mask=vm, question_mask=question).logits
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm, question_mask=question.long()).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
