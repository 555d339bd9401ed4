"""Tokenised samples: exact labels, image-token expansion, truncation, bad samples, collator and sampler."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaProcessor

from pmod.data import synth
from pmod.data.batching import LlavaCollator, ModalityLengthGroupedSampler
from pmod.data.dataset import IGNORE_INDEX, BadSampleError, LlavaDataset
from pmod.data.tokenizer import VICUNA_CHAT_TEMPLATE, build_llava_processor, build_word_tokenizer, image_processor_class

X = IGNORE_INDEX
SIZE, PATCH = 32, 8
N_IMAGE = (SIZE // PATCH) ** 2  # CLIP-like defaults: +1 CLS token, dropped by the "default" strategy


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(synth.vocabulary())


@pytest.fixture(scope="module")
def processor(tok) -> LlavaProcessor:
    return build_llava_processor(tok, SIZE, PATCH)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (SIZE, SIZE), (200, 200, 200)).save(root / "a.png")
    Image.new("RGB", (48, 40), (230, 25, 25)).save(root / "b.png")  # resized + cropped by the processor
    (root / "broken.png").write_bytes(b"not a png")
    return root


def conv(*pairs: str) -> list[dict[str, str]]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(pairs)]


TWO_TURNS = {
    "id": "two",
    "image": "a.png",
    "conversations": conv("<image>\nWhat color is the shape?", "red", "How many shapes are there?", "one"),
}


def test_word_tokenizer_ids(tok) -> None:
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    ids = tok("What color is it?</s>")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "What", "color", "is", "<unk>", "?", "</s>"]


def test_exact_labels_two_turns(tok, processor, folder: Path) -> None:
    ds = LlavaDataset([TWO_TURNS], processor, image_folder=folder, system_prompt="chat", conv_template="vicuna_v1")
    item = ds[0]
    w = tok.get_vocab()
    bos, eos, img, user, asst, colon, q = 2, 3, 4, w["USER"], w["ASSISTANT"], w[":"], w["?"]
    what, color, is_, the, shape = w["What"], w["color"], w["is"], w["the"], w["shape"]
    how, many, shapes, are, there = w["How"], w["many"], w["shapes"], w["are"], w["there"]
    red, one = w["red"], w["one"]
    # <s>chat USER: <image>x16 What color is the shape? ASSISTANT: red</s>USER: How many ... ASSISTANT: one</s>
    expected_ids = (
        [bos, w["chat"], user, colon]
        + [img] * N_IMAGE
        + [what, color, is_, the, shape, q, asst, colon, red, eos]
        + [user, colon, how, many, shapes, are, there, q, asst, colon, one, eos]
    )
    expected_labels = [X] * (4 + N_IMAGE) + [X] * 8 + [red, eos] + [X] * 10 + [one, eos]
    assert item["input_ids"].tolist() == expected_ids
    assert item["labels"].tolist() == expected_labels
    assert item["attention_mask"].tolist() == [1] * len(expected_ids)
    assert item["pixel_values"].shape == (1, 3, SIZE, SIZE)


def test_chat_template_matches_vicuna(tok, folder: Path) -> None:
    plain = build_llava_processor(tok, SIZE, PATCH)
    templated = build_llava_processor(tok, SIZE, PATCH, chat_template=VICUNA_CHAT_TEMPLATE)
    records = [
        TWO_TURNS,
        {"id": "t", "conversations": conv("How many sides does a square have?", "four")},
        {"id": "s", "conversations": [{"from": "system", "value": "chat"}, *conv("Is red a color?", "yes")]},
    ]
    a = LlavaDataset(records, plain, image_folder=folder)  # auto: no template -> vicuna_v1
    b = LlavaDataset(records, templated, image_folder=folder)  # auto: the chat template
    assert not a.use_chat_template and b.use_chat_template
    for i in range(len(records)):
        assert a[i]["input_ids"].tolist() == b[i]["input_ids"].tolist()
        assert a[i]["labels"].tolist() == b[i]["labels"].tolist()
    assert tok.decode(a[2]["input_ids"]).startswith("<s> chat USER")  # the record's system turn
    with pytest.raises(ValueError, match="no chat template"):
        LlavaDataset(records, plain, conv_template="chat_template")


@pytest.mark.parametrize("kind", ["metaspace", "bytelevel"])
def test_labels_with_subword_tokenizers(kind: str, folder: Path) -> None:
    """Llama-like (Metaspace) and GPT-like (ByteLevel) BPE: a reply's leading space joins its first token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pmod.data.tokenizer import SPECIAL_TOKENS, TEMPLATE_TEXT

    backend = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "metaspace":
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet: list[str] = []
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator([*synth.vocabulary(), TEMPLATE_TEXT, "What color is the shape?"] * 3, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ds = LlavaDataset([TWO_TURNS], build_llava_processor(tok, SIZE, PATCH), image_folder=folder)
    item = ds[0]
    targets = [tok.convert_ids_to_tokens(int(t)) for t in item["labels"] if t != X]
    space = "\u2581" if kind == "metaspace" else "\u0120"
    assert "".join(targets).replace(space, " ") == " red</s> one</s>"
    tokens = tok.convert_ids_to_tokens(item["input_ids"].tolist())
    starts = [p for p in range(1, len(tokens)) if item["labels"][p] != X and item["labels"][p - 1] == X]
    assert len(starts) == 2 and all(tokens[p - 1].endswith(":") for p in starts)  # right after "ASSISTANT:"


@pytest.mark.parametrize(("strategy", "extra", "count"), [("default", 1, 16), ("full", 1, 17), ("full", 0, 16)])
def test_image_tokens_follow_processor(tok, folder: Path, strategy: str, extra: int, count: int) -> None:
    proc = build_llava_processor(
        tok, SIZE, PATCH, vision_feature_select_strategy=strategy, num_additional_image_tokens=extra
    )
    direct = proc(text=["<image>"], images=[Image.open(folder / "b.png")], return_tensors="pt")
    assert int((direct["input_ids"] == proc.image_token_id).sum()) == count
    record = {"id": "m", "image": ["b.png", "a.png"], "conversations": conv("Is <image> the <image> ?", "no")}
    item = LlavaDataset([record], proc, image_folder=folder)[0]
    ids = item["input_ids"].tolist()
    start = ids.index(proc.image_token_id)
    w = tok.get_vocab()
    # <image> stays where it was written: "Is", run of image tokens, "the", run, "?"
    assert ids[start - 1] == w["Is"] and ids[start + count] == w["the"] and ids[start + 2 * count + 1] == w["?"]
    assert ids.count(proc.image_token_id) == 2 * count
    assert item["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert (item["labels"][torch.tensor(ids) == proc.image_token_id] == X).all()


def test_truncation_never_cuts_image_tokens(tok, processor, folder: Path) -> None:
    short = {**TWO_TURNS, "id": "short", "conversations": conv("<image>", "red")}
    records = [TWO_TURNS, short]
    full, short_full = (LlavaDataset(records, processor, image_folder=folder, system_prompt="chat")[i] for i in (0, 1))
    n = len(full["input_ids"])
    image_end = full["input_ids"].tolist().index(4) + N_IMAGE
    first_target = next(i for i, t in enumerate(full["labels"].tolist()) if t != X)
    kept, stood_in = [], []
    for max_length in range(1, n + 1):
        ds = LlavaDataset(records, processor, image_folder=folder, system_prompt="chat", max_length=max_length)
        try:
            item = ds[0]
        except BadSampleError:  # neither record fits
            assert ds.stats["dropped_too_long"] == 2
            continue
        assert (item["input_ids"] == 4).sum() == N_IMAGE  # every image token, always
        if item["input_ids"].tolist() == full["input_ids"][:max_length].tolist():
            kept.append(max_length)
            assert item["labels"].tolist() == full["labels"][:max_length].tolist()
            assert ds.stats == {"bad": 0, "dropped_too_long": 0, "truncated": int(max_length < n)}
        else:  # record 0 dropped; record 1 (also with an image) stands in
            stood_in.append(max_length)
            assert item["input_ids"].tolist() == short_full["input_ids"][:max_length].tolist()
            assert ds.stats["dropped_too_long"] == 1 and "(id two)" in ds.summary()
    # kept exactly when the image tokens and at least one reply token fit
    assert kept == list(range(max(image_end, first_target + 1), n + 1))
    assert stood_in == list(range(len(short_full["input_ids"]) - 1, kept[0]))
    drop = LlavaDataset([TWO_TURNS, TWO_TURNS], processor, image_folder=folder, max_length=n - 1, truncation="drop")
    with pytest.raises(BadSampleError, match="no usable record left to stand in for record 0"):
        drop[0]
    assert drop.stats["dropped_too_long"] == 2 and "tokens > max_length" in drop.summary()


def test_skip_and_error_on_bad_samples(processor, folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = [
        TWO_TURNS,
        {"id": "gone", "image": "missing.png", "conversations": conv("<image>\nWhat color is the shape?", "red")},
        {"id": "text-bad", "conversations": conv("How many sides does a square have?")},
        {"id": "broken", "image": "broken.png", "conversations": conv("<image>\nWhat color is the shape?", "red")},
        {**TWO_TURNS, "id": "good2", "image": "b.png"},
        {"id": "text", "conversations": conv("How many sides does a square have?", "four")},
    ]
    ds = LlavaDataset(records, processor, image_folder=folder)
    with caplog.at_level(logging.WARNING, logger="pmod.data.dataset"):
        got = [ds[i] for i in range(len(ds))]
    # a bad record is replaced by the next usable one of the same modality
    same = [(1, 4), (2, 5), (3, 4)]
    for bad, good in same:
        assert got[bad]["input_ids"].tolist() == got[good]["input_ids"].tolist()
    assert "pixel_values" not in got[2]
    assert [(b.index, b.id, b.reason.split(":")[0]) for b in ds.bad_samples] == [
        (1, "gone", "missing_image"),
        (2, "text-bad", "no_assistant_turn"),
        (3, "broken", "unreadable_image"),
    ]
    assert ds.stats == {"bad": 3, "dropped_too_long": 0, "truncated": 0}
    assert sum("skipping record" in r.message for r in caplog.records) == 3  # once per record

    strict = LlavaDataset(records, processor, image_folder=folder, on_bad_sample="error")
    assert strict[0]["input_ids"].tolist() == got[0]["input_ids"].tolist()
    with pytest.raises(BadSampleError, match=r"record 1 \(id gone\): missing_image: .*missing.png not found"):
        strict[1]
    with pytest.raises(BadSampleError, match=r"record 2 \(id text-bad\): no_assistant_turn"):
        strict[2]
    assert LlavaDataset(records, processor, image_folder=folder).scan() == ds.stats


def test_a_lone_bad_record_of_its_modality_never_stops_a_run(processor, folder: Path) -> None:
    """A `null` record (text-only by its modality) among image records, and a lone bad image record among text-only
    ones: no usable record of their modality is left, so one of the other modality stands in instead of raising
    (which used to stop training at that step, and again on every resume)."""
    text = {"id": "text", "conversations": conv("How many sides does a square have?", "four")}
    for records, bad, good in (([TWO_TURNS, None], 1, 0), ([text, {**TWO_TURNS, "image": "missing.png"}], 1, 0)):
        ds = LlavaDataset(records, processor, image_folder=folder)
        assert ds[bad]["input_ids"].tolist() == ds[good]["input_ids"].tolist()
        assert ds.stats == {"bad": 1, "dropped_too_long": 0, "truncated": 0}
    with pytest.raises(BadSampleError, match="no usable record left to stand in for record 0"):
        LlavaDataset([None, None], processor, image_folder=folder)[0]


def test_collator_padding(processor, folder: Path) -> None:
    records = [
        TWO_TURNS,
        {"id": "t", "conversations": conv("Is red a color?", "yes")},
        {"id": "s", "image": "b.png", "conversations": conv("<image>", "red")},
    ]
    items = [LlavaDataset(records, processor, image_folder=folder)[i] for i in range(3)]
    lengths = [len(it["input_ids"]) for it in items]
    collate = LlavaCollator.from_tokenizer(processor.tokenizer)
    assert collate.pad_token_id == 0
    batch = collate(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    for row, (it, n) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][row, :n].tolist() == it["input_ids"].tolist()
        assert batch["input_ids"][row, n:].tolist() == [0] * (max(lengths) - n)
        assert batch["labels"][row, n:].tolist() == [X] * (max(lengths) - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
    # images in item order, text-only item contributes none
    assert batch["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"][0])
    assert "pixel_values" not in collate([items[1]])

    left = LlavaCollator(pad_token_id=7, padding_side="left", pad_to_multiple_of=16)(items[1:])
    width = -(-max(lengths[1:]) // 16) * 16
    assert left["input_ids"].shape[1] == width
    assert left["input_ids"][0].tolist() == [7] * (width - lengths[1]) + items[1]["input_ids"].tolist()
    assert left["attention_mask"][0].tolist() == [0] * (width - lengths[1]) + [1] * lengths[1]


def test_collator_llava_next(tok, folder: Path) -> None:
    import transformers

    image_processor = image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_grid_pinpoints=[[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE], [2 * SIZE, 2 * SIZE]],
    )
    proc = transformers.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    Image.new("RGB", (2 * SIZE, SIZE)).save(folder / "wide.png")
    records = [{"id": n, "image": n, "conversations": conv("<image>", "red")} for n in ("a.png", "wide.png")]
    items = [LlavaDataset(records, proc, image_folder=folder)[i] for i in range(2)]
    for it, name in zip(items, ("a.png", "wide.png")):
        with Image.open(folder / name) as im:
            size = [im.height, im.width]
        assert it["image_sizes"].tolist() == [size]
        expected = proc._get_num_multimodal_tokens(image_sizes=[size])["num_image_tokens"][0]
        assert int((it["input_ids"] == proc.image_token_id).sum()) == expected  # grows with the image size
    patches = [it["pixel_values"].shape[1] for it in items]
    assert patches[0] < patches[1]
    batch = LlavaCollator.from_tokenizer(tok)(items)
    assert batch["pixel_values"].shape == (2, max(patches), 3, SIZE, SIZE)
    assert (batch["pixel_values"][0, patches[0] :] == 0).all()
    assert batch["image_sizes"].tolist() == [[SIZE, SIZE], [SIZE, 2 * SIZE]]


def test_processor_save_load(tok, folder: Path, tmp_path: Path) -> None:
    proc = build_llava_processor(tok, SIZE, PATCH, chat_template=VICUNA_CHAT_TEMPLATE)
    proc.save_pretrained(tmp_path)
    loaded = LlavaProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == VICUNA_CHAT_TEMPLATE and loaded.patch_size == PATCH
    a = LlavaDataset([TWO_TURNS], proc, image_folder=folder)[0]
    b = LlavaDataset([TWO_TURNS], loaded, image_folder=folder)[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def _check_sampler(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    sampler = ModalityLengthGroupedSampler(lengths, batch_size, seed=seed)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each index exactly once
    for b in batches:
        assert 1 <= len(b) <= batch_size
        assert len({lengths[i] > 0 for i in b}) == 1  # one modality per batch
    assert sum(len(b) < batch_size for b in batches) <= 2  # only each modality's last batch may be short
    return batches


def test_sampler_modalities_coverage_determinism() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 50, (103,), generator=gen)]
    lengths = [n if k % 4 else -n for k, n in enumerate(lengths)]  # 26 text-only samples
    for batch_size, seed, epoch in itertools.product((1, 4, 8), (0, 1), (0, 1)):
        _check_sampler(lengths, batch_size, seed, epoch)
    assert _check_sampler(lengths, 8, 0, 0) == _check_sampler(lengths, 8, 0, 0)
    assert _check_sampler(lengths, 8, 0, 0) != _check_sampler(lengths, 8, 0, 1)
    assert _check_sampler(lengths, 8, 0, 0) != _check_sampler(lengths, 8, 1, 0)
    text_only = [n for n in lengths if n < 0]
    assert sorted(i for b in _check_sampler(text_only, 8, 0, 0) for i in b) == list(range(len(text_only)))

    dropped = list(ModalityLengthGroupedSampler(lengths, 8, drop_last=True))
    assert len(dropped) == 77 // 8 + 26 // 8 and all(len(b) == 8 for b in dropped)
    with pytest.raises(ValueError, match="non-zero"):
        ModalityLengthGroupedSampler([1, 0], 2)


def test_sampler_ranks() -> None:
    lengths = [k + 1 if k % 3 else -(k + 1) for k in range(41)]
    ranks = [list(ModalityLengthGroupedSampler(lengths, 4, world_size=2, rank=r, seed=3)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(ModalityLengthGroupedSampler(lengths, 4, world_size=2))
    assert {i for r in ranks for b in r for i in b} == set(range(41))
    for b0, b1 in zip(*ranks):  # the two ranks' k-th batches share a modality
        assert len({lengths[i] > 0 for i in b0 + b1}) == 1


def test_batches_train_a_tiny_llava(tok, processor, tmp_path: Path) -> None:
    """End to end: synth data -> dataset -> sampler -> collator -> LlavaForConditionalGeneration loss."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    synth.generate(tmp_path, 24, seed=0, image_size=SIZE, test_fraction=0.0)
    ds = LlavaDataset(tmp_path / "train.json", processor)
    sampler = ModalityLengthGroupedSampler(ds.modality_lengths, 6)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=LlavaCollator.from_tokenizer(tok))
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=SIZE, patch_size=PATCH, **small),
        text_config=LlamaConfig(vocab_size=len(tok), num_key_value_heads=2, **small),
        image_token_id=processor.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    seen = 0
    for batch in loader:
        loss = model(**batch).loss  # raises if image tokens and image features disagree
        assert torch.isfinite(loss)
        seen += len(batch["input_ids"])
    assert seen == len(ds) and ds.stats["bad"] == 0
