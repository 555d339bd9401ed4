"""Conversion of Hugging Face models: identity, reloading, errors, hidden states, checkpointing, bf16."""

import copy
import math

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import pmod
from pmod import PModConfig
from pmod.testing import (
    IMAGE_TOKEN_ID,
    enable_activation_checkpointing,
    llava_batch,
    llava_next_batch,
    randomize_routers,
    tiny_llama,
    tiny_llava,
    tiny_llava_next,
)

RATIO_ONE = PModConfig(schedule="explicit", ratios=[None] + [1.0] * 5)
TEXT = [(3, 5), (2, 2), (6, 1)]


def llama_batch():
    ids = torch.randint(4, 128, (3, 20), generator=torch.Generator().manual_seed(0))
    am = torch.ones(3, 20, dtype=torch.long)
    am[0, :4] = 0  # left padded row
    am[1, :7] = 0
    vm = torch.zeros(3, 20, dtype=torch.bool)
    vm[0, 6:16] = True
    vm[1, 8:12] = True
    return {"input_ids": ids, "attention_mask": am, "vision_mask": vm}


def build(kind: str, padding_side: str = "left"):
    if kind == "llava":
        model = tiny_llava()
        return model, llava_batch(model, TEXT, [True, True, False], padding_side)
    if kind == "llava_next":
        model = tiny_llava_next()
        return model, llava_next_batch(model, TEXT, [(16, 32), (32, 32), None], padding_side)
    return tiny_llama(), llama_batch()


def forward(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("kind", ["llava", "llava_next", "llama"])
def test_ratio_one_zero_router_is_identity(kind):
    model, batch = build(kind)
    dense_batch = {k: v for k, v in batch.items() if k != "vision_mask"}
    want = forward(model, dense_batch)
    pmod.convert(model, RATIO_ONE)
    got = forward(model, batch)
    real = batch["attention_mask"].bool()  # padding positions carry no meaning in either model
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_vision_tokens_are_routed_per_row(kind):
    model, batch = build(kind, padding_side="right")
    pmod.convert(model)
    randomize_routers(model)
    ratios = pmod.layer_ratios(model)
    vision = batch["input_ids"] == IMAGE_TOKEN_ID
    real = batch["attention_mask"].bool()
    with pmod.record_routing(model) as rec, torch.no_grad():
        model(**batch)
    assert sorted(rec.processed) == [i for i, r in enumerate(ratios) if r is not None]
    for layer, masks in rec.processed.items():
        processed = masks[0]
        expected = [math.floor(int(n) * ratios[layer]) for n in vision.sum(1)]
        assert (processed & vision).sum(1).tolist() == expected
        assert torch.equal(processed & ~vision, real & ~vision)  # all text, never padding


def test_a_reloaded_model_saves_again(tmp_path):
    """A second save of a reloaded model writes the same architecture name and settings (the first round trip, on
    every method and backbone, is tests/test_matrix.py's)."""
    model, _ = build("llava_next")
    pmod.convert(model, PModConfig(beta=0.45, weight_norm="tanh"))
    model.save_pretrained(tmp_path)
    pmod.load(tmp_path).save_pretrained(tmp_path / "again")
    again = pmod.load(tmp_path / "again")
    assert type(again) is type(model) and pmod.get_method_config(again) == PModConfig(beta=0.45)
    assert pmod.layer_ratios(again) == pmod.layer_ratios(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_load_with_dtype_and_device_map(tmp_path, dtype):
    """``pmod.load(..., dtype=, device_map="cpu")``: every weight, routers included, arrives in that dtype, equal to
    the in-memory model's cast, and so do the logits. from_pretrained casts parameters only (RoPE frequencies stay
    fp32), so the reference does the same."""
    model, batch = build("llava")
    pmod.convert(model)
    randomize_routers(model, scale=3.0)
    model.save_pretrained(tmp_path)
    loaded = pmod.load(tmp_path, dtype=dtype, device_map="cpu").eval()
    cast = copy.deepcopy(model)
    for param in cast.parameters():
        param.data = param.data.to(dtype)
    assert {(p.dtype, p.device.type) for p in loaded.parameters()} == {(dtype, "cpu")}
    want, got = cast.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    batch = {**batch, "pixel_values": batch["pixel_values"].to(dtype)}
    torch.testing.assert_close(forward(loaded, batch), forward(cast, batch), atol=0, rtol=0)


def test_loading_without_pmod_is_refused_by_convert(tmp_path):
    model = pmod.convert(tiny_llava())
    model.save_pretrained(tmp_path)
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pmod.load"):
        pmod.convert(plain)


def test_errors_name_the_fix(tmp_path):
    model = tiny_llama(num_layers=3)
    with pytest.raises(ValueError, match="Layer 0 cannot be a routed layer"):
        pmod.convert(copy.deepcopy(model), PModConfig(schedule="explicit", ratios=[0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="has 2 entries but the model has 3"):
        pmod.convert(copy.deepcopy(model), PModConfig(schedule="explicit", ratios=[None, 0.5]))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        pmod.convert(torch.nn.Linear(2, 2))
    pmod.convert(model)
    with pytest.raises(ValueError, match="already converted"):
        pmod.convert(model)
    with pytest.raises(ValueError, match="vision_mask has shape"):
        model(input_ids=torch.ones(2, 5, dtype=torch.long), vision_mask=torch.ones(2, 4, dtype=torch.bool))


def test_load_opens_a_dense_folder_as_transformers_does(tmp_path):
    """pmod.load is the one loader: a folder without a routing method loads as the dense model it holds."""
    model = tiny_llama(num_layers=3).eval()
    model.save_pretrained(tmp_path)
    loaded = pmod.load(tmp_path, dtype=torch.float32).eval()
    assert type(loaded) is type(model) and pmod.get_method_config(loaded) is None and not pmod.routed_layers(loaded)
    ids = torch.arange(1, 9)[None]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_output_hidden_states_full_length():
    model, batch = build("llava")
    dense = copy.deepcopy(model)
    pmod.convert(model)
    randomize_routers(model)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        want = dense(**batch, output_hidden_states=True).hidden_states
    seq = batch["input_ids"].shape[1]
    assert len(out.hidden_states) == 7
    assert all(h.shape == (3, seq, 64) for h in out.hidden_states)
    # Up to the first routed layer they are the dense model's; the last one (after the norm) gives the logits.
    first = min(pmod.routed_layers(model))
    for i in range(first + 1):
        torch.testing.assert_close(out.hidden_states[i], want[i], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits, atol=1e-5, rtol=0)


def test_activation_checkpointing_matches():
    model, batch = build("llava", padding_side="right")
    pmod.convert(model)
    randomize_routers(model)
    model.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def grads(m):
        m.zero_grad()
        loss = m(**batch, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = grads(model)
    ckpt = copy.deepcopy(model)
    enable_activation_checkpointing(ckpt)
    assert ckpt.model.language_model.layers[1].gradient_checkpointing  # replayed in backward, not kept
    loss_ckpt, grads_ckpt = grads(ckpt)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_ckpt.keys() == grads_plain.keys()
    assert any("router" in n for n in grads_plain)
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-4)


def test_bf16_long_sequence_is_finite():
    model = tiny_llama(num_layers=4).to(torch.bfloat16)
    pmod.convert(model, PModConfig(schedule="explicit", ratios=[None, 0.5, 0.3, 0.15]))
    randomize_routers(model)
    seq = 2100
    ids = torch.randint(4, 128, (2, seq), generator=torch.Generator().manual_seed(0))
    vm = torch.zeros(2, seq, dtype=torch.bool)
    vm[:, 16:2016] = True
    am = torch.ones(2, seq, dtype=torch.long)
    am[1, :50] = 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, vision_mask=vm).logits
    assert logits.dtype == torch.bfloat16
    assert bool(torch.isfinite(logits[am.bool()]).all())


@pytest.mark.parametrize("family", ["Qwen2", "Mistral"])
def test_other_llama_family_decoders(family):
    import transformers

    config_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(0)
    config = config_cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0,
    )  # fmt: skip
    routed = model_cls(copy.deepcopy(config)).eval()
    model = model_cls(config).eval()
    batch = llama_batch()
    want = forward(model, {k: v for k, v in batch.items() if k != "vision_mask"})
    pmod.convert(model, PModConfig(schedule="explicit", ratios=[None, 1.0, 1.0, 1.0]))
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(forward(model, batch)[real], want[real], atol=1e-5, rtol=0)
    # With routing, tokens before the first vision token of a row cannot change (causality).
    routed.load_state_dict(model.state_dict(), strict=False)  # same weights; routers stay out of it
    pmod.convert(routed, PModConfig(schedule="explicit", ratios=[None, 0.5, 0.3, 0.2]))
    randomize_routers(routed)
    got = forward(routed, batch)
    torch.testing.assert_close(got[0, 4:6], want[0, 4:6], atol=1e-5, rtol=0)


def test_damaged_weight_files_are_named_before_loading(tmp_path):
    """A weights file whose size does not match its safetensors header, a shard an index lists but the folder
    lacks, a torch zip cut short, a folder without weights: one error naming the file, before any tensor is read."""
    import struct
    from pathlib import Path

    from pmod.core.errors import UserError
    from pmod.io.model_folder import check_model_folder
    from pmod.testing import tiny_llava_folder

    folder = Path(tiny_llava_folder(str(tmp_path / "m"), num_layers=2, method_config=PModConfig()))
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    cases = [
        (good + b"\0" * 4, f"its header describes {len(good)} bytes, the file has {len(good) + 4}"),
        (good[:5], "5 bytes, shorter than a safetensors header"),
        (struct.pack("<Q", 2**40) + good[8:], f"its header claims {2**40} bytes, the file has {len(good)}"),
        (good[:8] + b"{" * length + good[8 + length :], "its header is not valid JSON"),
    ]
    for data, detail in cases:
        weights.write_bytes(data)
        for load in (pmod.load, check_model_folder):
            with pytest.raises(UserError) as err:
                load(folder)
            assert str(err.value).startswith(f"{weights} is truncated or corrupt ({detail}")
            assert str(err.value).endswith("; re-save or re-download it.")
    weights.write_bytes(good)
    assert pmod.is_routed_model(pmod.load(folder))

    model = pmod.load(folder)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(UserError, match=f"model.safetensors.index.json lists {shards[-1].name}, which is not in"):
        pmod.load(sharded)

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    torch.save({"w": torch.zeros(4096)}, bare / "pytorch_model.bin")
    (bare / "pytorch_model.bin").write_bytes((bare / "pytorch_model.bin").read_bytes()[:-100])
    with pytest.raises(UserError, match="pytorch_model.bin is truncated or corrupt .a zip archive without"):
        pmod.load(bare)
    (bare / "pytorch_model.bin").unlink()
    with pytest.raises(UserError, match="has a config.json but no weights"):
        pmod.load(bare)
