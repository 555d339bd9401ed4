"""gamma-MoD specifics: the shared router, masked routing over text, the routing loss, ARank and layer choice."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import pmod
from pmod import GammaMoDConfig
from pmod.cli import main
from pmod.data import synth
from pmod.methods.gamma_arank import attention_rank, numerical_rank
from pmod.methods.gamma_mod import choose_layers
from pmod.testing import randomize_routers, routed_batch, tiny_llama, tiny_llava_folder
from pmod.testing.reference import reference_logits, reference_rules

ROWS = [(12, 20, False), (10, 8, True), (9, 0, False)]
CONFIG = GammaMoDConfig(layers=[1, 2, 3, 5], skip_ratio=0.5)


def converted(config: GammaMoDConfig = CONFIG) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense = tiny_llama(num_layers=6, attn_implementation="eager")
    model = pmod.convert(copy.deepcopy(dense), config)
    randomize_routers(model, scale=3.0)
    return dense, model


def question_mask(am: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    """The first three real text tokens of each row are the question."""
    text = am.bool() & ~vm
    return text & (text.long().cumsum(1) <= 3)


def test_one_router_shared_by_every_mod_layer() -> None:
    _, model = converted()
    names = [name for name, _ in model.named_parameters() if "router" in name]
    assert names == ["model.gamma_mod_router.weight", "model.gamma_mod_router.bias"]
    routers = {id(layer.routing_rule.router) for layer in pmod.routed_layers(model).values()}
    assert routers == {id(model.model.gamma_mod_router)} and sorted(pmod.routed_layers(model)) == [1, 2, 3, 5]


def test_masked_routing_routes_text_outside_the_question() -> None:
    dense, model = converted()
    ids, am, vm = routed_batch(ROWS, "left")
    question = question_mask(am, vm)
    with torch.no_grad(), pmod.record_routing(model) as rec:
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm, question_mask=question).logits
        want = reference_logits(dense, reference_rules(model), ids, am, vm, question_mask=question)
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)
    routable = (real & ~question).sum(1)
    for processed in rec.processed.values():
        assert processed[0].sum(1).tolist() == [3 + math.floor(n * 0.5) for n in routable.tolist()]
        assert bool(processed[0][question].all())  # question tokens are always processed


def test_every_mod_layer_sends_gradient_to_the_shared_router() -> None:
    _, model = converted()
    model.train()
    ids, am, vm = routed_batch(ROWS, "right")
    router = model.model.gamma_mod_router
    layers = pmod.routed_layers(model)

    def grad_with_router_only_in(keep: set[int]) -> torch.Tensor:
        frozen = copy.deepcopy(router).requires_grad_(False)
        for i, layer in layers.items():
            layer.routing_rule.router = router if i in keep else frozen
        model.zero_grad()
        model(input_ids=ids, attention_mask=am, vision_mask=vm).logits.pow(2).mean().backward()
        for layer in layers.values():
            layer.routing_rule.router = router
        return router.weight.grad.clone()

    per_layer = [grad_with_router_only_in({i}) for i in layers]
    assert all(float(g.abs().sum()) > 0 for g in per_layer)
    torch.testing.assert_close(grad_with_router_only_in(set(layers)), sum(per_layer), atol=1e-6, rtol=1e-4)


def test_routing_loss_equals_hand_computation() -> None:
    """Loss = LM loss + 0.01 * sum over MoD layers of CE(router logits, top-k labels) over the routable tokens."""
    _, model = converted()
    model.train()
    ids, am, vm = routed_batch(ROWS, "right")
    labels = ids.masked_fill(~am.bool() | vm, -100)
    labels[:, :4] = -100  # a prompt: the first text tokens have no label
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k, i=i: inputs.__setitem__(i, a[0] if a else k["hidden_states"]),
                                        with_kwargs=True)
        for i, layer in pmod.routed_layers(model).items()
    ]  # fmt: skip
    with pmod.record_routing(model) as rec:
        out = model(input_ids=ids, attention_mask=am, vision_mask=vm, labels=labels)
    for hook in hooks:
        hook.remove()
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    real = am.bool()
    question = real & ~vm & (labels == -100)  # the fallback without question_mask: prompt text
    routable = real & ~question
    hand = 0.0
    for i, layer in pmod.routed_layers(model).items():
        logits = model.model.gamma_mod_router(layer.input_layernorm(inputs[i])).float()
        kept = rec.processed[i][0] & routable
        hand = hand + F.cross_entropy(logits[routable], kept[routable].long())
    hand = 0.01 * hand
    torch.testing.assert_close(pmod.routing_loss(model), hand.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss.detach(), (lm + hand).detach(), atol=1e-6, rtol=1e-5)
    # Outside training nothing is collected or added.
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, vision_mask=vm, labels=labels).loss
    torch.testing.assert_close(plain, lm.detach(), atol=1e-6, rtol=1e-5)
    assert float(hand) > 0


@pytest.mark.parametrize("r", [1, 3, 7])
def test_rank_of_matrices_with_known_rank(r: int) -> None:
    g = torch.Generator().manual_seed(r)
    u, v = torch.randn(3, 20, r, generator=g), torch.randn(3, 20, r, generator=g)
    assert numerical_rank(u @ v.transpose(-1, -2)).tolist() == [r, r, r]
    # As attention maps: 4 heads of head dim 8 whose queries span r directions.
    q = torch.randn(4, 20, r, generator=g) @ torch.randn(r, 8, generator=g)
    k = torch.randn(4, 20, 8, generator=g)
    assert attention_rank(q, k) == r


def test_layer_choice_is_below_the_fourth_largest() -> None:
    values = [30.0, 12.0, 25.0, 8.0, 31.0, 10.0, 29.0, 5.0]
    assert choose_layers(values, 4) == [1, 3, 5, 7]  # 4th largest is 29: 30, 31 and 29 stay dense, and layer 0
    assert GammaMoDConfig(layers="arank", arank=values).resolved(8).layers == [1, 3, 5, 7]


def test_arank_command_equals_hooked_qk(tmp_path) -> None:
    folder = tiny_llava_folder(str(tmp_path / "model"), num_layers=4, image_size=32, patch_size=8)
    train_json, _ = synth.generate(tmp_path / "data", 6, seed=0, image_size=32)
    out = tmp_path / "arank.json"
    rc = main(["arank", "--model", folder, "--data", str(train_json), "--samples", "3", "--out", str(out),
               "--plot", str(tmp_path / "arank.png"), "--json"])  # fmt: skip
    assert rc == 0 and (tmp_path / "arank.png").is_file()
    result = json.loads(out.read_text())

    # Direct computation: q/k projections captured by hooks, RoPE applied with the layer's own cos/sin.
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from pmod.data.batching import LlavaCollator
    from pmod.data.dataset import LlavaDataset

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    dataset = LlavaDataset(str(train_json), processor)
    layers = model.model.language_model.layers
    seen: dict[int, dict[str, torch.Tensor]] = {i: {} for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        hooks.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: seen[i].__setitem__("q", o)))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: seen[i].__setitem__("k", o)))
        hooks.append(attn.register_forward_pre_hook(
            lambda m, a, k, i=i: seen[i].__setitem__("pe", k["position_embeddings"]), with_kwargs=True))  # fmt: skip
    sums = [0.0] * len(layers)
    for n in range(3):
        batch = LlavaCollator.from_tokenizer(processor.tokenizer)([dataset[n]])
        batch.pop("labels")
        with torch.no_grad():
            model(**batch, use_cache=False)
        for i in range(len(layers)):
            hd = layers[i].self_attn.head_dim
            q = seen[i]["q"].view(1, -1, 4, hd).transpose(1, 2)
            k = seen[i]["k"].view(1, -1, 4, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, *seen[i]["pe"])
            ranks = [torch.linalg.matrix_rank(q[0, h] @ k[0, h].T).item() for h in range(4)]
            sums[i] += sum(ranks) / 4
    for hook in hooks:
        hook.remove()
    assert result["arank"] == pytest.approx([s / 3 for s in sums], abs=1e-9)
    assert result["mod_layers"] == choose_layers(result["arank"], 4)
    assert all(0 < v <= layers[0].self_attn.head_dim for v in result["arank"])


def test_arank_file_resolves_layers_and_the_saved_model_needs_no_file(tmp_path) -> None:
    values = [9.0, 3.0, 4.0, 8.0, 2.0, 7.0]
    path = tmp_path / "arank.json"
    path.write_text(json.dumps({"arank": values}))
    dense, model = converted(GammaMoDConfig(layers="arank", arank_file=str(path), threshold_rank=3))
    assert sorted(pmod.routed_layers(model)) == [1, 2, 4]  # below 7.0, the 3rd largest; layer 0 stays dense
    model.save_pretrained(tmp_path / "saved")
    path.unlink()
    loaded = pmod.load(tmp_path / "saved")
    assert sorted(pmod.routed_layers(loaded)) == [1, 2, 4]
    assert pmod.get_method_config(loaded).layers == [1, 2, 4]


def test_bad_configs_name_the_fix(tmp_path) -> None:
    with pytest.raises(ValueError, match="pmod arank"):
        pmod.convert(tiny_llama(num_layers=6), GammaMoDConfig())  # layers="arank" without values
    with pytest.raises(ValueError, match="6 layers"):
        pmod.convert(tiny_llama(num_layers=6), GammaMoDConfig(arank=[1.0, 2.0]))
    with pytest.raises(ValueError, match="skip_ratio"):
        GammaMoDConfig(skip_ratio=1.0)


def test_renumbered_positions_need_no_cache() -> None:
    _, model = converted(GammaMoDConfig(layers=[1, 2], renumber_positions=True))
    ids, am, vm = routed_batch(ROWS, "right")
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False).logits
        _, own = converted(GammaMoDConfig(layers=[1, 2]))
        kept_positions = own(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=False).logits
        assert not torch.allclose(plain, kept_positions)  # the positions differ, so do the outputs
        with pytest.raises(ValueError, match="use_cache=False"):
            model(input_ids=ids, attention_mask=am, vision_mask=vm, use_cache=True)


def test_unknown_prefill_rule_is_refused_in_one_line() -> None:
    """A misspelt rule ('topk') used to run the top-k path without a word."""
    with pytest.raises(ValueError, match="prefill_rule 'topk' is unknown; choose top_k or threshold."):
        pmod.GammaMoDConfig(prefill_rule="topk")
