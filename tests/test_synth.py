"""The synthetic VQA generator: determinism, split, closed vocabulary, and answers that match the pixels."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pmod.cli import main
from pmod.core.files import LOCK_NAME, OutputLock
from pmod.data import set_swap, synth
from pmod.data.llava_format import check_records
from pmod.data.tokenizer import build_word_tokenizer


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the writer's lock (which names the last writer's pid)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}  # fmt: skip


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(out, 300, seed=7, image_size=64, test_fraction=0.2)
    return out


def _records(root: Path) -> list[dict]:
    return json.loads((root / "train.json").read_text()) + json.loads((root / "test.json").read_text())


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        synth.generate(tmp_path / name, 30, seed=seed, image_size=32)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert len(a) > 20  # json files and most images
    assert a["train.json"] != c["train.json"]
    assert {k: v for k, v in a.items() if k.endswith(".png")} != {k: v for k, v in c.items() if k.endswith(".png")}


def test_split_and_layout(synth_dir: Path) -> None:
    train = json.loads((synth_dir / "train.json").read_text())
    test = json.loads((synth_dir / "test.json").read_text())
    assert (len(train), len(test)) == (240, 60)
    assert [r["id"] for r in train + test] == [f"synth-{i:06d}" for i in range(300)]
    report = check_records(synth_dir / "train.json", synth_dir)
    assert report.ok, report.format()
    assert report.n_text_only > 0 and report.n_with_images > 200
    records = train + test
    assert any(len(r["conversations"]) == 4 for r in records if "image" in r)  # multi-turn about one image
    assert any(len(r["conversations"]) == 4 for r in records if "image" not in r)
    firsts = [r["conversations"][0]["value"] for r in records if "image" in r]
    assert any(v.startswith("<image>\n") for v in firsts) and any(v.endswith("\n<image>") for v in firsts)
    for r in records:  # <image> only in the first human turn of image samples
        counts = [t["value"].count("<image>") for t in r["conversations"]]
        assert counts == [1 if "image" in r else 0] + [0] * (len(counts) - 1)
    with Image.open(synth_dir / records[0]["image"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"


def test_vocabulary_is_closed(synth_dir: Path) -> None:
    vocab, answers = set(synth.vocabulary()), set(synth.answer_vocabulary())
    assert answers <= vocab
    assert {"yes", "no", "left", "right", "red", "circle", "three", "?"} <= vocab and "<image>" not in vocab
    tok = build_word_tokenizer(synth.vocabulary())
    for r in _records(synth_dir):
        for j, turn in enumerate(r["conversations"]):
            if j % 2:
                assert turn["value"] in answers
            ids = tok(turn["value"], add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, turn["value"]


def _classify(mask: np.ndarray) -> str:
    # From the rendered pixels only: a square fills its box, a triangle's base row is full, a circle fills ~0.7-0.85
    # of its box and a diamond ~0.5 (measured over thousands of renders at 32-96 px).
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    if fill == 1.0:
        return "square"
    if box[-1].mean() == 1.0:
        return "triangle"
    return "circle" if fill > 0.6 else "diamond"


def _expected_answer(question: str, shapes: dict[str, dict]) -> str:
    """The answer computed from facts read off the image (``shapes``: kind -> colour/side)."""
    colors = {s["color"] for s in shapes.values()}
    if question == "How many shapes are there?":
        return synth.NUMBERS[len(shapes)]
    if question == "What color is the shape?":
        (only,) = shapes.values()
        return only["color"]
    if question == "What shape is in the image?":
        (only,) = shapes
        return only
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        return shapes[m[1]]["color"]
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        return next(k for k, s in shapes.items() if s["color"] == m[1])
    if m := re.fullmatch(r"Is the (\w+) on the left or the right\?", question):
        return shapes[m[1]]["side"]
    if m := re.fullmatch(r"Is there a (\w+) shape\?", question):
        return "yes" if m[1] in colors else "no"
    if m := re.fullmatch(r"Is there a (\w+)\?", question):
        return "yes" if m[1] in shapes else "no"
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_the_pixels(synth_dir: Path) -> None:
    checked = 0
    for r in _records(synth_dir):
        if "image" not in r:
            continue
        pixels = np.asarray(Image.open(synth_dir / r["image"]).convert("RGB"))
        size = pixels.shape[1]
        shapes, covered = {}, np.zeros(pixels.shape[:2], bool)
        for color, rgb in synth.COLORS.items():
            mask = (pixels == rgb).all(-1)
            if not mask.any():
                continue
            xs = np.nonzero(mask)[1]
            assert xs.max() < size // 2 or xs.min() >= size // 2, "a shape straddles the middle"
            side = "left" if xs.max() < size // 2 else "right"
            shapes[_classify(mask)] = {"color": color, "side": side}
            covered |= mask
        assert 1 <= len(shapes) <= 3 and covered.mean() < 0.2  # shapes are a minority of the pixels
        assert (pixels[~covered] == r["meta"]["background"]).all()  # the rest is plain background
        assert sorted(shapes) == sorted(s["shape"] for s in r["meta"]["shapes"])
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            question = q["value"].replace("<image>", "").strip()
            assert a["value"] == _expected_answer(question, shapes), (r["id"], question)
            checked += 1
    assert checked > 250


def test_text_only_answers() -> None:
    for q, a in synth.text_only_questions():
        if m := re.fullmatch(r"How many sides does a (\w+) have\?", q):
            assert a == {"triangle": "three", "square": "four", "diamond": "four"}[m[1]]
        else:
            word = re.fullmatch(r"Is (\w+) a shape or a color\?", q)[1]
            assert a == ("shape" if word in synth.SHAPES else "color")


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert main(["data", "synth", "--out", str(out), "--n", "10", "--seed", "3", "--image-size", "32"]) == 0
    assert len(json.loads((out / "train.json").read_text())) == 9
    assert "wrote 9 samples" in capsys.readouterr().out
    assert main(["data", "synth", "--out", str(out), "--n", "5", "--seed", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--n", "5", "--seed", "3", "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) <= 5  # no stale images from the larger run
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--n", "5", "--image-size", "16"]) == 2


def _question_kind(question: str) -> str:
    """The generator's question kind of an image question, from its wording."""
    if question.startswith("How many"):
        return "count"
    if question.startswith("Is there"):
        return "exists"
    if question.startswith("What color"):
        return "color"
    if question.startswith(("Which shape", "What shape")):
        return "shape"
    if "left or the right" in question:
        return "position"
    raise AssertionError(question)


def test_question_kind_names_every_question() -> None:
    """The library's classifier (used by the demo's per-kind accuracy) agrees with the wording-based one here."""
    questions = {q for q, _ in synth.image_questions()}
    assert {synth.question_kind(q) for q in questions} == set(synth.QUESTION_KINDS)
    for q in questions:
        assert synth.question_kind(q) == _question_kind(q), q
    assert {synth.question_kind(q) for q, _ in synth.text_only_questions()} == {"other"}


def test_one_shape_and_chosen_question_kinds(tmp_path: Path) -> None:
    synth.generate(tmp_path, 120, seed=5, image_size=64, max_shapes=1, question_kinds=["color", "position"])
    records = [r for r in _records(tmp_path) if "image" in r]
    assert len(records) > 90
    kinds = set()
    for r in records:
        assert len(r["meta"]["shapes"]) == 1
        pixels = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        assert sum((pixels == rgb).all(-1).any() for rgb in synth.COLORS.values()) == 1  # one coloured object drawn
        for q in r["conversations"][::2]:
            kinds.add(_question_kind(q["value"].replace("<image>", "").strip()))
    assert kinds == {"color", "position"}
    for bad in ({"max_shapes": 0}, {"max_shapes": 4}, {"question_kinds": ["colour"]}, {"question_kinds": []}):
        with pytest.raises(ValueError, match="max_shapes|question_kinds"):
            synth.generate(tmp_path / "bad", 4, overwrite=True, **bad)


def test_cli_synth_shapes_and_questions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "synth", "--out", str(tmp_path / "d"), "--n", "20", "--max-shapes", "1", "--questions", "color"]
    assert main(args) == 0
    questions = [r["conversations"][0]["value"] for r in _records(tmp_path / "d") if "image" in r]
    assert questions and all("What color" in q for q in questions)
    assert main(["data", "synth", "--out", str(tmp_path / "e"), "--n", "5", "--questions", "size"]) == 2
    assert "question_kinds must be" in capsys.readouterr().err


def test_patch_labels_by_hand() -> None:
    """A red square covering patches (0,1) fully and 10 px of patch (1,1), a blue 2x2 dot: labels counted by hand."""
    image = Image.new("RGB", (16, 16), (200, 200, 200))
    for x in range(8, 16):
        for y in range(0, 8):
            image.putpixel((x, y), synth.COLORS["red"])
    for x in range(8, 13):
        for y in range(8, 10):  # 10 pixels of 64: above the 10% cover threshold
            image.putpixel((x, y), synth.COLORS["red"])
    for x in range(0, 2):
        for y in range(8, 10):  # 4 pixels of 64: below it
            image.putpixel((x, y), synth.COLORS["blue"])
    meta = {"shapes": [{"shape": "square", "color": "red"}, {"shape": "circle", "color": "blue"}]}
    labels = synth.patch_labels(image, meta, 8)
    red, square = 1 + sorted(synth.COLORS).index("red"), 1 + synth.SHAPES.index("square")
    assert labels["grid"] == (2, 2)
    assert labels["color"] == [0, red, 0, red]
    assert labels["shape"] == [0, square, 0, square]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        synth.patch_labels(image, meta, 5)


def _consistent(root: Path) -> None:
    """Every record's image exists and its meta matches the pixels (the colour of each shape is drawn there)."""
    records = _records(root)
    assert check_records(root / "train.json", root).ok
    for r in records:
        if "image" in r:
            pixels = np.asarray(Image.open(root / r["image"]).convert("RGB"))
            for s in r["meta"]["shapes"]:
                x0, y0, x1, y1 = s["bbox"]
                assert (pixels[y0 : y1 + 1, x0 : x1 + 1] == synth.COLORS[s["color"]]).all(-1).any(), r["id"]
    assert len(list((root / "images").iterdir())) == sum("image" in r for r in records)  # nothing stale


def test_overwrite_that_fails_partway_keeps_the_old_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--overwrite` dying halfway through the new images (here: an error at sample 12) leaves the old set as it
    was, byte for byte, and no staging; the user's other files in the folder are never touched."""
    out = tmp_path / "d"
    synth.generate(out, 20, seed=1, image_size=32)
    (out / "notes.txt").write_text("mine")
    before = _files(out)
    make_sample = synth.make_sample

    def failing(index, *args, **kwargs):
        if index == 12:
            raise RuntimeError("killed")
        return make_sample(index, *args, **kwargs)

    monkeypatch.setattr(synth, "make_sample", failing)
    with pytest.raises(RuntimeError, match="killed"):
        synth.generate(out, 30, seed=2, image_size=32, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["images", "notes.txt", "test.json", "train.json"]
    _consistent(out)
    monkeypatch.undo()
    synth.generate(out, 30, seed=2, image_size=32, overwrite=True)
    _consistent(out)
    assert len(_records(out)) == 30 and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kill_at", range(1, 8))
def test_kill_during_the_swap_leaves_one_whole_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_at) -> None:
    """A kill at any of the swap's six renames (simulated: the rename raises and no clean-up runs), or after them
    (7: before the old set is deleted), leaves a folder that the next run turns into the old set (before the last
    rename, of train.json) or the new one, whole, never a mix; the killed run's staging is removed."""
    out = tmp_path / "d"
    synth.generate(out, 12, seed=1, image_size=32)
    old = _files(out)
    synth.generate(tmp_path / "new", 16, seed=2, image_size=32)
    new = _files(tmp_path / "new")
    calls = []
    replace = set_swap.os.replace

    class Killed(BaseException):
        pass

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == kill_at:
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(set_swap.os, "replace", dying_replace)
    for module in (synth, set_swap):  # a kill runs no clean-up
        monkeypatch.setattr(module, "finish_interrupted_swap", lambda out: None)
    monkeypatch.setattr(set_swap.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(Killed) if kill_at <= 6 else contextlib.nullcontext():
        synth.generate(out, 16, seed=2, image_size=32, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == min(kill_at, 6)
    assert any(p.name.endswith(".partial") for p in out.iterdir())  # what the kill left
    synth.finish_interrupted_swap(out)  # what the next run does first
    assert not [p for p in out.iterdir() if p.name.startswith(".pmod-synth")]
    assert _files(out) == (new if kill_at == 7 else old), calls
    _consistent(out)


def test_cli_synth_output_folder_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing file as --out, and a second writer of a folder in use, get one line each; once the first
    writer is gone (as after a kill: the lock dies with its process), the folder is written."""
    (tmp_path / "file").write_text("x")
    args = ["data", "synth", "--n", "4", "--image-size", "32", "--out"]
    assert main([*args, str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is an existing file, not a folder" in err and len(err.splitlines()) == 1
    with OutputLock(tmp_path / "d", "pmod data synth"):
        assert main([*args, str(tmp_path / "d")]) == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by pmod data synth (pid {os.getpid()})" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "d" / "train.json").exists()
    assert main([*args, str(tmp_path / "d")]) == 0
    _consistent(tmp_path / "d")
