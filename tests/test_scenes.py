"""The scenes task (``pmod data synth --task scenes``): determinism, and every answer recomputed from the pixels."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pmod.cli import main
from pmod.data import scenes, synth
from pmod.data.tokenizer import build_word_tokenizer

SIZE = 64


@pytest.fixture(scope="module")
def scene_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    synth.generate(out, 240, seed=5, image_size=SIZE, turns=2, task="scenes", question_kinds=scenes.QUESTION_KINDS)
    return out


def _records(root: Path) -> list[dict]:
    return json.loads((root / "train.json").read_text()) + json.loads((root / "test.json").read_text())


def _classify(mask: np.ndarray) -> str:
    # From the pixels only: a square fills its box, a triangle's base row is full, a circle fills more of its box
    # than a diamond (about 0.75 against 0.5 at 5-7 px).
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    if box.mean() == 1.0:
        return "square"
    if box[-1].mean() == 1.0:
        return "triangle"
    return "circle" if box.mean() > 0.6 else "diamond"


def _read_scene(pixels: np.ndarray) -> list[dict]:
    """The shapes of a scene read off its pixels: one per grid cell that holds palette colours."""
    cell = pixels.shape[0] // scenes.GRID
    found = []
    for row in range(scenes.GRID):
        for col in range(scenes.GRID):
            block = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            hits = [(c, (block == rgb).all(-1)) for c, rgb in synth.COLORS.items() if (block == rgb).all(-1).any()]
            assert len(hits) <= 1, "two colours in one cell"
            if hits:
                color, mask = hits[0]
                found.append({"color": color, "shape": _classify(mask), "row": row, "col": col})
    return found


def _answer(question: str, shapes: list[dict]) -> str:
    """The answer of ``question`` worked out from shapes read off the image."""
    count = lambda **kw: scenes.NUMBERS[sum(all(s[k] == v for k, v in kw.items()) for s in shapes)]  # noqa: E731
    if question == "How many shapes are there?":
        return scenes.NUMBERS[len(shapes)]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return count(color=m[1])
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return count(shape=m[1])
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if count(color=m[1], shape=m[2]) != "zero" else "no"
    if m := re.fullmatch(r"What color is the shape in row (\w+), column (\w+)\?", question):
        row, col = scenes.NUMBERS.index(m[1]) - 1, scenes.NUMBERS.index(m[2]) - 1
        return next(s["color"] for s in shapes if (s["row"], s["col"]) == (row, col))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", question):
        a, b = ([s for s in shapes if (s["color"], s["shape"]) == name] for name in ((m[1], m[2]), (m[4], m[5])))
        assert len(a) == len(b) == 1, "a named shape is not unique"
        axis = "col" if m[3] == "left of" else "row"
        assert a[0][axis] != b[0][axis]
        return "yes" if a[0][axis] < b[0][axis] else "no"
    if m := re.fullmatch(r"Are there more shapes on the (\w+) or (\w+)\?", question):
        axis = "col" if m[1] == "left" else "row"
        low = sum(s[axis] < scenes.GRID // 2 for s in shapes)
        assert 2 * low != len(shapes)
        return m[1] if 2 * low > len(shapes) else m[2]
    key = {"What color do most shapes have?": "color", "Which shape is most common?": "shape"}[question]
    (top, n), *rest = Counter(s[key] for s in shapes).most_common()
    assert not rest or rest[0][1] < n, "no single most common"
    return top


def test_answers_match_the_pixels(scene_dir: Path) -> None:
    asked = Counter()
    for r in _records(scene_dir):
        if "image" not in r:
            continue
        pixels = np.asarray(Image.open(scene_dir / r["image"]).convert("RGB"))
        shapes = _read_scene(pixels)
        assert scenes.MIN_SHAPES <= len(shapes) <= scenes.MAX_SHAPES
        meta = sorted((s["cell"][0], s["cell"][1], s["color"], s["shape"]) for s in r["meta"]["shapes"])
        assert meta == sorted((s["row"], s["col"], s["color"], s["shape"]) for s in shapes)
        greys = pixels[(pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2])]
        assert len(greys) + sum(((pixels == rgb).all(-1)).sum() for rgb in synth.COLORS.values()) == SIZE * SIZE
        conv = r["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            question = q["value"].replace("<image>", "").strip()
            assert a["value"] == _answer(question, shapes), (r["id"], question)
            asked[synth.question_kind(question)] += 1
    assert set(asked) == set(scenes.QUESTION_KINDS) and min(asked.values()) >= 20, asked


def test_same_seed_same_bytes_and_closed_vocabulary(tmp_path: Path, scene_dir: Path) -> None:
    again = tmp_path / "again"
    synth.generate(again, 240, seed=5, image_size=SIZE, turns=2, task="scenes", question_kinds=scenes.QUESTION_KINDS)
    for name in ("train.json", "test.json"):
        assert (again / name).read_bytes() == (scene_dir / name).read_bytes()
    images = sorted(p.name for p in (scene_dir / "images").iterdir())
    assert images == sorted(p.name for p in (again / "images").iterdir())
    assert all((again / "images" / n).read_bytes() == (scene_dir / "images" / n).read_bytes() for n in images)
    tokenizer = build_word_tokenizer(synth.vocabulary("scenes"))
    texts = [t["value"].replace("<image>", "") for r in _records(scene_dir) for t in r["conversations"]]
    assert all(tokenizer.unk_token_id not in tokenizer(t)["input_ids"] for t in texts)


def test_default_kinds_and_patch_labels_of_repeated_colours(tmp_path: Path) -> None:
    """Without question_kinds a scenes set asks DEFAULT_KINDS only; two shapes of one colour are labelled each by
    its own kind (the label looks inside the shape's box)."""
    synth.generate(tmp_path, 60, seed=1, image_size=SIZE, task="scenes")
    kinds = {synth.question_kind(t["value"]) for r in _records(tmp_path) if "image" in r
             for t in r["conversations"][::2]}  # fmt: skip
    assert kinds <= set(scenes.DEFAULT_KINDS) and len(kinds) > 1
    image = Image.new("RGB", (16, 16), (200, 200, 200))
    for x, y in ((0, 0), (8, 8)):
        for dx in range(8):
            for dy in range(8):
                image.putpixel((x + dx, y + dy), synth.COLORS["red"])
    meta = {"shapes": [{"shape": "square", "color": "red", "bbox": [0, 0, 7, 7]},
                       {"shape": "circle", "color": "red", "bbox": [8, 8, 15, 15]}]}  # fmt: skip
    labels = synth.patch_labels(image, meta, 8)
    square, circle = (1 + synth.SHAPES.index(k) for k in ("square", "circle"))
    assert labels["shape"] == [square, 0, 0, circle]


def test_cli_task_scenes_and_its_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--task", "scenes", "--out", str(tmp_path / "s"), "--n", "20",
                 "--questions", "count,half"]) == 0  # fmt: skip
    kinds = {synth.question_kind(t["value"]) for r in _records(tmp_path / "s") if "image" in r
             for t in r["conversations"][::2]}  # fmt: skip
    assert kinds <= {"count", "half"}
    assert main(["data", "synth", "--task", "scenes", "--out", str(tmp_path / "t"), "--n", "5",
                 "--questions", "color"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert main(["data", "synth", "--task", "scenes", "--out", str(tmp_path / "u"), "--n", "5", "--image-size",
                 "60"]) == 2  # fmt: skip
    assert capsys.readouterr().err.strip().endswith("image_size of the scenes task must be a multiple of its 8-cell "
                                                    "grid, got 60")  # fmt: skip
    assert err[-1].endswith(f"question_kinds must be a non-empty subset of {', '.join(scenes.QUESTION_KINDS)} (the "
                            "scenes task's kinds); got ['color']")  # fmt: skip


def test_each_task_has_its_own_vocabulary() -> None:
    """The shapes task's words are those of pmod 0.2 (its demo model, tokenizer and weights are built as before the
    scenes task existed); the scenes task has its own."""
    assert synth.vocabulary() == [
        "?", "How", "Is", "What", "Which", "a", "are", "blue", "circle", "color", "diamond", "does", "four", "green",
        "have", "image", "in", "is", "left", "many", "no", "on", "one", "or", "orange", "purple", "red", "right",
        "shape", "shapes", "sides", "square", "the", "there", "three", "triangle", "two", "yellow", "yes",
    ]  # fmt: skip
    scene_words = set(synth.vocabulary("scenes"))
    assert {"eight", "circles", "bottom", "row", "column", "common"} <= scene_words
    assert not {"eight", "circles", "bottom"} & set(synth.vocabulary())


def test_demo_task_setting_makes_its_data(tmp_path: Path) -> None:
    """DemoSettings.task picks the generator and the demo's kinds for it (scenes: the two scene-wide ones, not the
    generator's default); the data is made again when the task changes."""
    from pmod.experiments.demo import DemoSettings
    from pmod.experiments.demo_runs import make_data

    for task, kinds in (("scenes", {"count", "half"}), ("shapes", {"color", "position"})):
        make_data(tmp_path, DemoSettings(task=task, samples=40))
        records = [r for r in _records(tmp_path) if "image" in r]
        asked = {synth.question_kind(t["value"]) for r in records for t in r["conversations"][::2]}
        assert asked <= kinds and len(asked) > 1
        assert all(("cell" in r["meta"]["shapes"][0]) == (task == "scenes") for r in records)


def test_lmms_eval_documents_of_a_scenes_set(scene_dir: Path) -> None:
    """pmod_shapes / pmod_shapes_mc read a scenes folder too: every kind named, its options the answers that kind
    allows (``half``: the two words its question names), the true answer among them."""
    from pmod.eval.tasks.shapes import documents

    docs = documents(scene_dir)
    assert {d["kind"] for d in docs} == set(scenes.QUESTION_KINDS)
    numbers = list(scenes.NUMBERS)
    want = {"count": numbers[3:9], "count_color": numbers, "count_shape": numbers, "cell": list(synth.COLORS),
            "most_color": list(synth.COLORS), "most_shape": list(synth.SHAPES), "exists": ["yes", "no"],
            "relation": ["yes", "no"]}  # fmt: skip
    for d in docs:
        half = re.fullmatch(r"Are there more shapes on the (\w+) or (\w+)\?", d["question"])
        assert d["choices"] == (list(half.groups()) if half else want[d["kind"]]), d["question"]
        assert d["answer"] in d["choices"]
