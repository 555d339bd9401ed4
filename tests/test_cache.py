"""Inference with the p-MoD KV cache: cached decoding equals recomputation, batching, beams, cache sizes."""

import math

import pytest
import torch

import pmod
from pmod.testing import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    llava_batch,
    llava_next_batch,
    randomize_routers,
    tiny_llava,
    tiny_llava_next,
)

# A random model may pick the image token; recomputing its own output would then count one image token too many.
GEN = dict(do_sample=False, pad_token_id=PAD_TOKEN_ID, eos_token_id=None, suppress_tokens=[IMAGE_TOKEN_ID])


def converted(kind: str):
    model = tiny_llava(num_layers=8) if kind == "llava" else tiny_llava_next(num_layers=8)
    pmod.convert(model)
    randomize_routers(model, scale=3.0)
    return model


def batch_for(model, kind: str, padding_side: str = "left"):
    text = [(3, 5), (2, 2), (6, 1), (4, 4)]
    if kind == "llava":
        return llava_batch(model, text, [True, True, False, True], padding_side)
    return llava_next_batch(model, text, [(16, 32), (32, 32), None, (32, 16)], padding_side)


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_cached_greedy_equals_recomputation(kind):
    model = converted(kind)
    batch = batch_for(model, kind)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, **GEN)
        full = model.generate(
            **batch, max_new_tokens=20, output_logits=True, return_dict_in_generate=True, use_cache=False, **GEN
        )
    assert torch.equal(cached.sequences, full.sequences)
    for step_cached, step_full in zip(cached.logits, full.logits, strict=True):
        torch.testing.assert_close(step_cached, step_full, atol=1e-4, rtol=0)


def test_batched_generation_equals_rows_alone():
    model = converted("llava_next")
    batch = batch_for(model, "llava_next")
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=12, **GEN)[:, -12:]
    pixel_row = 0
    for r in range(4):
        real = batch["attention_mask"][r].bool()
        row = {"input_ids": batch["input_ids"][r : r + 1, real], "attention_mask": torch.ones(1, int(real.sum()))}
        if (row["input_ids"] == IMAGE_TOKEN_ID).any():
            row["pixel_values"] = batch["pixel_values"][pixel_row : pixel_row + 1]
            row["image_sizes"] = batch["image_sizes"][pixel_row : pixel_row + 1]
            pixel_row += 1
        with torch.no_grad():
            alone = model.generate(**row, max_new_tokens=12, **GEN)[:, -12:]
        assert torch.equal(alone[0], together[r]), f"row {r}"


def test_beam_search_with_and_without_cache():
    model = converted("llava")
    batch = batch_for(model, "llava")
    kwargs = dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, **GEN)
    with torch.no_grad():
        cached = model.generate(**batch, **kwargs)
        full = model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, full)


def test_cached_token_counts_and_bytes():
    model = converted("llava_next")
    batch = batch_for(model, "llava_next", padding_side="right")
    with torch.no_grad():
        cache = model(**batch, use_cache=True).past_key_values
    size = pmod.kv_cache_bytes(cache)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    n_vision = (ids == IMAGE_TOKEN_ID).sum(1).tolist()
    n_text = (real & (ids != IMAGE_TOKEN_ID)).sum(1).tolist()
    for layer, ratio in enumerate(pmod.layer_ratios(model)):
        if ratio is None:
            assert size.layer_slots[layer] == ids.shape[1]
        else:
            want = [t + math.floor(v * ratio) for t, v in zip(n_text, n_vision)]
            assert size.layer_tokens[layer] == want
            assert size.layer_slots[layer] == max(want)
    by_hand = sum(
        (layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
        for layer in cache.layers
    )
    assert size.total_bytes == by_hand
    assert (
        size.total_bytes
        < pmod.kv_cache_bytes(tiny_llava_next(num_layers=8)(**batch, use_cache=True).past_key_values).total_bytes
    )


def test_follow_up_turns_on_an_existing_cache():
    """A text turn and then an image turn on top of a cache give the logits of one full forward."""
    model = converted("llava")
    full = llava_batch(model, [(5, 6)], [True], seed=1)
    ids = full["input_ids"]
    start = int((ids[0] == IMAGE_TOKEN_ID).nonzero()[0])  # the image arrives in the second chunk
    with torch.no_grad():
        want = model(**full).logits
        first = model(input_ids=ids[:, :start], attention_mask=full["attention_mask"][:, :start], use_cache=True)
        second = model(
            input_ids=ids[:, start:],
            attention_mask=full["attention_mask"],
            pixel_values=full["pixel_values"],
            past_key_values=first.past_key_values,
            use_cache=True,
        )
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), want, atol=1e-4, rtol=0)


def test_other_cache_types_are_refused():
    from transformers import StaticCache

    model = converted("llava")
    batch = batch_for(model, "llava")
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=256)
    with pytest.raises(TypeError, match="dynamic cache"), torch.no_grad():
        model(**batch, past_key_values=cache, use_cache=True)
