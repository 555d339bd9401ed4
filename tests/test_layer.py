"""The compacted p-MoD computation against an independent dense reference written here."""

import copy
import math

import pytest
import torch

import pmod
from pmod import PModConfig
from pmod.testing import randomize_routers, tiny_llama


def reference_forward(dense_model, routers, ratios, input_ids, attention_mask, vision_mask, cfg: PModConfig):
    """A plain full-length forward of the unconverted model applying the p-MoD rules with explicit masks.

    Every layer runs over all T tokens. In a p-MoD layer the attention mask removes unprocessed tokens as keys
    (and as queries: their rows are discarded), then the STRing output rules are applied token by token.
    """
    lm = dense_model.model
    bsz, seq = input_ids.shape
    real = attention_mask.bool()
    x = lm.embed_tokens(input_ids)
    pos = torch.arange(seq)[None].expand(bsz, seq)
    cos_sin = lm.rotary_emb(x, pos)
    causal = torch.ones(seq, seq).tril().bool()
    eye = torch.eye(seq, dtype=torch.bool)
    for idx, layer in enumerate(lm.layers):
        ratio = ratios[idx]
        if ratio is None:
            processed = real
        else:
            logits = routers[idx](x).squeeze(-1).float()
            processed = real & ~vision_mask
            for b in range(bsz):
                vis = [p for p in range(seq) if vision_mask[b, p] and real[b, p]]
                k = math.floor(len(vis) * ratio)
                kept = sorted(vis, key=lambda p: (-logits[b, p].item(), p))[:k]
                processed[b, kept] = True
        allowed = (causal[None] & processed[:, None, :] | eye[None])[:, None]
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)  # additive
        h = x + layer.self_attn(layer.input_layernorm(x), attention_mask=mask, position_embeddings=cos_sin)[0]
        m = layer.mlp(layer.post_attention_layernorm(h))
        if ratio is None:
            x = h + m
            continue
        w = cfg.scale * torch.tanh(logits) + cfg.bias if cfg.weight_norm == "tanh" else None
        vis = vision_mask & real
        y = torch.where(processed[..., None], h + m, x)  # text (and pads, unchanged)
        y = torch.where((vis & processed)[..., None], h + w[..., None] * m, y)
        skipped = vis & ~processed
        y = torch.where(skipped[..., None], (w[..., None] * x) if cfg.string else x, y)
        x = y
    return dense_model.lm_head(lm.norm(x))


def make_batch(rows, padding_side, vocab=128, seed=0):
    """rows: list of (n_text, n_vision, interleave) -> ids, attention mask, vision mask."""
    g = torch.Generator().manual_seed(seed)
    seq = max(t + v for t, v, _ in rows)
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    am = torch.zeros(len(rows), seq, dtype=torch.long)
    vm = torch.zeros(len(rows), seq, dtype=torch.bool)
    for r, (t, v, inter) in enumerate(rows):
        kinds = torch.tensor([1] * v + [0] * t)
        if inter:
            kinds = kinds[torch.randperm(t + v, generator=g)]
        else:  # 2 text tokens, the image, then the rest of the text
            kinds = torch.cat([torch.zeros(min(2, t)), torch.ones(v), torch.zeros(t - min(2, t))]).long()
        start = seq - t - v if padding_side == "left" else 0
        ids[r, start : start + t + v] = torch.randint(4, vocab, (t + v,), generator=g)
        am[r, start : start + t + v] = 1
        vm[r, start : start + t + v] = kinds.bool()
    return ids, am, vm


ROWS = [(5, 23, False), (9, 11, True), (4, 0, False), (6, 17, False)]  # unequal vision counts, a row without


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("ratios", [[None, 0.9, 0.5, 0.25, 0.15, 0.5], [None, None, 0.7, 0.7, 1.0, 0.3]])
def test_compacted_equals_dense_reference(padding_side, attn, ratios):
    dense = tiny_llama(num_layers=6, attn_implementation=attn)
    model = pmod.convert(copy.deepcopy(dense), PModConfig(schedule="explicit", ratios=ratios))
    randomize_routers(model, scale=3.0)
    ids, am, vm = make_batch(ROWS, padding_side)
    routers = {i: layer.router for i, layer in pmod.pmod_layers(model).items()}
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
        want = reference_forward(dense, routers, ratios, ids, am, vm, pmod.get_pmod_config(model))
    real = am.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-4)


def test_string_off_reference_and_int_masks():
    ratios = [None, 0.5, 0.3]
    cfg = PModConfig(schedule="explicit", ratios=ratios, string=False)
    dense = tiny_llama(num_layers=3)
    model = pmod.convert(copy.deepcopy(dense), cfg)
    randomize_routers(model, scale=3.0)
    ids, am, vm = make_batch(ROWS, "left", seed=3)
    routers = {i: layer.router for i, layer in pmod.pmod_layers(model).items()}
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
    routers = {i: layer.router for i, layer in pmod.pmod_layers(model).items()}
    with pmod.record_routing(model) as rec, torch.no_grad():
        got = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    want = reference_forward(dense, routers, ratios, ids, am, vm, PModConfig())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert rec.processed[1][0].sum(1).tolist() == [6 + 8] * 3
    assert rec.processed[2][0].sum(1).tolist() == [6 + 4] * 3
    # Text tokens are always processed; the weights are the TanhNorm of the router logits.
    assert bool(rec.processed[2][0][~vm].all())
    assert float(rec.weights[1][0].min()) >= 0.8 and float(rec.weights[1][0].max()) <= 1.2


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
