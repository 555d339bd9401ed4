"""Inference with the p-MoD KV cache: cached decoding equals recomputation, batching, beams, assisted decoding,
row selection and reset, cache sizes."""

import math

import pytest
import torch

import pmod
from pmod.core.cache import CACHE_NAME, cache_kwargs, cache_of
from pmod.testing import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    llava_batch,
    llava_next_batch,
    randomize_routers,
    routed_batch,
    tiny_llama,
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
        cache = cache_of(model(**batch, use_cache=True))
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
        < pmod.kv_cache_bytes(cache_of(tiny_llava_next(num_layers=8)(**batch, use_cache=True))).total_bytes
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
            **cache_kwargs(cache_of(first)),
            use_cache=True,
        )
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), want, atol=1e-4, rtol=0)


def test_other_cache_types_are_refused():
    from transformers import DynamicCache

    class OtherCache(DynamicCache):  # a cache pmod knows nothing of (a subclass with its own bookkeeping)
        pass

    model = converted("llava")
    batch = batch_for(model, "llava")
    cache = OtherCache()
    with pytest.raises(TypeError, match="cannot use OtherCache; use the default dynamic cache"), torch.no_grad():
        model(**batch, **cache_kwargs(cache), use_cache=True)


# Prompt lookup on transformers 5.5.4 needs an end token; suppressing it keeps every run at full length.
EOS = 1
DRAFTED = {**GEN, "eos_token_id": EOS, "suppress_tokens": [IMAGE_TOKEN_ID, EOS], "max_new_tokens": 16}


def spy_on_crop(monkeypatch) -> list[int]:
    """Record how many tokens each ``RoutedCache.crop`` removed (measured on layer 0, which caches every token)."""
    removed, crop = [], pmod.RoutedCache.crop

    def spy(cache, tokens):
        before = cache.get_seq_length()
        crop(cache, tokens)
        removed.append(before - cache.get_seq_length())

    monkeypatch.setattr(pmod.RoutedCache, "crop", spy)
    return removed


@pytest.mark.parametrize("drafter", ["assistant", "prompt_lookup"])
def test_drafted_decoding_equals_recomputation(monkeypatch, drafter):
    """Assisted decoding (a second, smaller p-MoD model drafts) and prompt lookup verify draft tokens in one forward
    and crop the rejected ones from the caches: tokens and logits are the main model's greedy ones, recomputed
    without a cache."""
    model = converted("llava")
    batch = llava_batch(model, [(5, 6)], [True], seed=5)  # lookup drafts here are partly right, partly wrong
    if drafter == "assistant":
        assistant = tiny_llava(num_layers=4, seed=1)
        pmod.convert(assistant)
        randomize_routers(assistant, scale=3.0, seed=1)
        kwargs = dict(assistant_model=assistant, num_assistant_tokens=4, num_assistant_tokens_schedule="constant")
    else:
        kwargs = dict(prompt_lookup_num_tokens=3)
    out = dict(output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(**batch, use_cache=False, **out, **DRAFTED)
        removed = spy_on_crop(monkeypatch)
        got = model.generate(**batch, **kwargs, **out, **DRAFTED)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=1e-4, rtol=0)
    assert max(removed) > 0  # drafts were rejected and cropped, not only accepted


def test_selected_rows_decode_like_those_rows_recomputed():
    """``batch_select_indices`` keeps the chosen rows' K/V and slot records: decoding then goes on as a forward
    without cache over those rows does. Contrastive search, its user, is a Hub ``custom_generate`` repo in
    transformers 5.x (not available offline), so the selection is checked directly."""
    model = converted("llava")
    batch = batch_for(model, "llava")  # rows 0, 1 and 3 have an image; left padding
    rows, images = [2, 1, 3], [1, 2]  # rows of unequal lengths; images are numbered over the rows that have one
    ids, am = batch["input_ids"][rows], batch["attention_mask"][rows]
    pixels = batch["pixel_values"][images]
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        cache = cache_of(out)
        cache.batch_select_indices(torch.tensor(rows))
        token = out.logits[rows, -1].argmax(-1, keepdim=True)
        for _ in range(4):
            ids, am = torch.cat([ids, token], dim=1), torch.cat([am, torch.ones_like(token)], dim=1)
            step = model(input_ids=token, attention_mask=am, **cache_kwargs(cache), use_cache=True).logits[:, -1]
            full = model(input_ids=ids, attention_mask=am, pixel_values=pixels).logits[:, -1]
            torch.testing.assert_close(step, full, atol=1e-4, rtol=0)
            token = step.argmax(-1, keepdim=True)


def test_reset_cache_serves_a_new_prompt_like_a_fresh_one():
    """After ``reset`` the same cache object holds nothing, and a different prompt and a decode step on it give the
    logits of a forward without cache."""
    model = converted("llava")
    first, second = (llava_batch(model, [text], [True], seed=seed) for text, seed in (((5, 6), 1), ((2, 9), 2)))
    cache = pmod.RoutedCache()
    with torch.no_grad():
        model(**first, **cache_kwargs(cache), use_cache=True)
        cache.reset()
        assert pmod.kv_cache_bytes(cache).total_bytes == 0 and cache.get_seq_length() == 0
        prefill = model(**second, **cache_kwargs(cache), use_cache=True).logits
        token = prefill[:, -1].argmax(-1, keepdim=True)
        am = torch.cat([second["attention_mask"], torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=am, **cache_kwargs(cache), use_cache=True).logits
        ids = torch.cat([second["input_ids"], token], dim=1)
        want = model(input_ids=ids, attention_mask=am, pixel_values=second["pixel_values"]).logits
    torch.testing.assert_close(torch.cat([prefill, step], dim=1), want, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the alias under test
@pytest.mark.parametrize("name", sorted({"past_key_values", CACHE_NAME}))
def test_routed_layer_takes_the_cache_under_either_name(name):
    """transformers 5.24 passes the cache as ``cache`` (``past_key_values`` is a deprecated alias until 5.40): a
    routed layer called under either name returns what it returned in the model's forward and caches the same K/V
    and slot record."""
    model = pmod.convert(tiny_llama(num_layers=3), pmod.PModConfig(schedule="explicit", ratios=[None, 0.5, 0.3]))
    randomize_routers(model, scale=3.0)
    ids, am, vm = routed_batch([(5, 12, False), (4, 7, True)], "left")
    layer, seen, cache = model.model.layers[1], {}, pmod.RoutedCache()
    hook = layer.register_forward_hook(lambda m, a, k, o: seen.update(args=a, kwargs=k, out=o), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, vision_mask=vm, **cache_kwargs(cache), use_cache=True)
    hook.remove()
    inputs = {k: v for k, v in seen["kwargs"].items() if k not in ("cache", "past_key_values")}
    again = pmod.RoutedCache()
    with torch.no_grad():
        out = layer(*seen["args"], **inputs, **{name: again})
    assert torch.equal(out, seen["out"])
    assert torch.equal(again.layers[1].keys, cache.layers[1].keys)
    assert torch.equal(again.layers[1].values, cache.layers[1].values)
    assert torch.equal(again.slot_mask(1), cache.slot_mask(1))
