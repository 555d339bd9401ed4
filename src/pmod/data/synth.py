"""A synthetic visual-question-answering set: coloured shapes on plain backgrounds, one-word answers.

Each image has 1-3 shapes of distinct kinds and distinct colours, each inside one cell of a 4x4 grid, so shapes
never overlap, cover a small part of the image (most patches are background) and each lies wholly in the left or
right half. Questions ask about colour, shape, count and position; answers come from a small closed set
(:func:`answer_vocabulary`), and every word of every possible question or answer is in :func:`vocabulary`, so a
word-level tokenizer built from it never meets an unknown word. Output is deterministic: the same seed gives
byte-identical JSON and PNG files.

Besides ``id``/``image``/``conversations``, image records carry ``meta``: the background colour and each shape's
kind, colour and pixel bounding box ``[x0, y0, x1, y1]`` (inclusive), for evaluation and for checking which
patches a model keeps.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pmod.core.files import PARTIAL_SUFFIX, OutputLock, check_output_folder
from pmod.data.set_swap import DATASET_ENTRIES, STAGING_PREFIX, entry_exists, finish_interrupted_swap, swap_in

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Neutral greys: never close to a shape colour, so a shape's pixels are exactly its palette colour.
BACKGROUNDS: tuple[tuple[int, int, int], ...] = tuple((v, v, v) for v in (250, 225, 200, 160, 110, 70, 35))
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
SIDES: dict[str, int] = {"triangle": 3, "square": 4, "diamond": 4}
GRID = 4  # cells per side
MAX_SHAPES = 3
#: Question kinds, the keys ``question_kinds`` picks from.
QUESTION_KINDS: tuple[str, ...] = ("color", "count", "exists", "position", "shape")
#: The synthetic tasks: ``shapes`` (this module: 1-3 shapes, the easy task, the default of ``pmod demo``) and
#: ``scenes`` (:mod:`pmod.data.scenes`: cluttered scenes, ``pmod demo --task scenes``). Each has its own vocabulary,
#: so that a model of one task is built as it was before the other existed.
TASKS: tuple[str, ...] = ("scenes", "shapes")

TEXT_ONLY_FRACTION = 0.05
MULTI_TURN_FRACTION = 0.2
IMAGE_AFTER_QUESTION_FRACTION = 0.1  # "<image>" placed after the question instead of before

_WORD_RE = re.compile(r"\w+|[^\w\s]+")  # the split of tokenizers' Whitespace pre-tokenizer


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``bbox`` is inclusive pixel coordinates ``(x0, y0, x1, y1)``, ``side`` the image half
    (``left``/``right``) that holds the whole shape."""

    kind: str
    color: str
    bbox: tuple[int, int, int, int]
    side: str


def _questions_about(shapes: list[Shape], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Question/answer pairs for an image, grouped by question type (so types can be sampled evenly)."""
    present = {s.color for s in shapes}
    kinds = {s.kind for s in shapes}
    qa: dict[str, list[tuple[str, str]]] = {
        "count": [("How many shapes are there?", NUMBERS[len(shapes)])],
        "color": [(f"What color is the {s.kind}?", s.color) for s in shapes],
        "shape": [(f"Which shape is {s.color}?", s.kind) for s in shapes],
        "position": [(f"Is the {s.kind} on the left or the right?", s.side) for s in shapes],
    }
    if len(shapes) == 1:
        qa["color"].append(("What color is the shape?", shapes[0].color))
        qa["shape"].append(("What shape is in the image?", shapes[0].kind))
    # yes/no, balanced between present and absent
    color = rng.choice(sorted(present) if rng.random() < 0.5 else sorted(set(COLORS) - present))
    kind = rng.choice(sorted(kinds) if rng.random() < 0.5 else sorted(set(SHAPES) - kinds))
    qa["exists"] = [
        (f"Is there a {color} shape?", "yes" if color in present else "no"),
        (f"Is there a {kind}?", "yes" if kind in kinds else "no"),
    ]
    return qa


_KIND_PATTERNS = (
    ("count", "how many shapes"),
    ("color", "what color is"),
    ("shape", "which shape is"),
    ("shape", "what shape is in"),
    ("position", "on the left or the right"),
    ("exists", "is there a"),
)


def question_kind(question: str) -> str:
    """The question kind an image question of either task belongs to (:data:`QUESTION_KINDS`,
    :data:`pmod.data.scenes.QUESTION_KINDS`; "other" for the rest)."""
    from pmod.data import scenes

    text = question.lower()
    return scenes.question_kind(text) or next((kind for kind, pattern in _KIND_PATTERNS if pattern in text), "other")


def task_question_kinds(task: str) -> tuple[str, ...]:
    """The question kinds of ``task`` (one of :data:`TASKS`)."""
    from pmod.data import scenes

    return scenes.QUESTION_KINDS if task == "scenes" else QUESTION_KINDS


def text_only_questions() -> list[tuple[str, str]]:
    qa = [(f"How many sides does a {k} have?", NUMBERS[n]) for k, n in SIDES.items()]
    qa += [(f"Is {w} a shape or a color?", "shape") for w in SHAPES]
    qa += [(f"Is {w} a shape or a color?", "color") for w in COLORS]
    return qa


def image_questions() -> list[tuple[str, str]]:
    """Every question an image can get (answers: any possible), for the vocabulary."""
    qa = [("How many shapes are there?", n) for n in NUMBERS[1 : MAX_SHAPES + 1]]
    qa += [("What color is the shape?", c) for c in COLORS] + [("What shape is in the image?", k) for k in SHAPES]
    for k in SHAPES:
        qa += [(f"What color is the {k}?", c) for c in COLORS]
        qa += [(f"Is the {k} on the left or the right?", side) for side in ("left", "right")]
        qa += [(f"Is there a {k}?", a) for a in ("yes", "no")]
    for c in COLORS:
        qa += [(f"Which shape is {c}?", k) for k in SHAPES] + [(f"Is there a {c} shape?", a) for a in ("yes", "no")]
    return qa


def _words(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in _WORD_RE.findall(t)})


def _task_questions(task: str) -> list[tuple[str, str]]:
    from pmod.data import scenes

    return (scenes.image_questions() if task == "scenes" else image_questions()) + text_only_questions()


def answer_vocabulary(task: str = "shapes") -> list[str]:
    """Every possible answer of ``task`` (one word each), sorted."""
    return sorted({a for _, a in _task_questions(task)})


def vocabulary(task: str = "shapes") -> list[str]:
    """Every word and punctuation mark of every possible question and answer of ``task`` (one of :data:`TASKS`),
    split like ``tokenizers``' ``Whitespace`` pre-tokenizer, sorted. ``<image>`` is not included (a special
    token)."""
    qa = _task_questions(task)
    return _words([q for q, _ in qa] + [a for _, a in qa])


def render(
    size: int, rng: random.Random, max_shapes: int = MAX_SHAPES
) -> tuple[Image.Image, list[Shape], tuple[int, int, int]]:
    """Draw 1 to ``max_shapes`` shapes of distinct kinds and colours on a plain grey background (no
    anti-aliasing, so every shape pixel has exactly its palette colour)."""
    cell = size // GRID
    n = rng.randint(1, max_shapes)
    kinds = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    cells = rng.sample(range(GRID * GRID), n)
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    shapes = []
    for kind, color, c in zip(kinds, colors, cells):
        extent = rng.randint(max(3, int(cell * 0.55)), max(3, int(cell * 0.9)))
        x0 = (c % GRID) * cell + rng.randint(0, cell - extent)
        y0 = (c // GRID) * cell + rng.randint(0, cell - extent)
        x1, y1 = x0 + extent - 1, y0 + extent - 1
        draw_shape(draw, kind, (x0, y0, x1, y1), COLORS[color])
        side = "left" if c % GRID < GRID // 2 else "right"
        shapes.append(Shape(kind, color, (x0, y0, x1, y1), side))
    return image, shapes, background


def draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, bbox: tuple[int, int, int, int], rgb: tuple[int, int, int]
) -> None:
    """Draw a shape of ``kind`` filling the inclusive pixel box ``bbox``, without anti-aliasing."""
    x0, y0, x1, y1 = bbox
    if kind == "circle":
        draw.ellipse(bbox, fill=rgb)
    elif kind == "square":
        draw.rectangle(bbox, fill=rgb)
    elif kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=rgb)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=rgb)


def _human(question: str, with_image: bool, rng: random.Random) -> str:
    if not with_image:
        return question
    return f"{question}\n<image>" if rng.random() < IMAGE_AFTER_QUESTION_FRACTION else f"<image>\n{question}"


def _conversation(pairs: list[tuple[str, str]], with_image: bool, rng: random.Random) -> list[dict[str, str]]:
    conv = []
    for j, (q, a) in enumerate(pairs):
        conv.append({"from": "human", "value": _human(q, with_image and j == 0, rng)})
        conv.append({"from": "gpt", "value": a})
    return conv


def make_sample(
    index: int,
    size: int,
    rng: random.Random,
    turns: int | None = None,
    max_shapes: int = MAX_SHAPES,
    question_kinds: Sequence[str] | None = None,
    task: str = "shapes",
) -> tuple[dict[str, Any], Image.Image | None]:
    """One record (and its image, None for text-only samples) of ``task``; the image path is ``images/<id>.png``.

    ``turns`` asks that many questions about each image (at most one per question kind); None mixes one- and
    two-turn samples. ``question_kinds`` (from :func:`task_question_kinds`) limits what image questions ask about;
    ``max_shapes`` applies to the ``shapes`` task.
    """
    sid = f"synth-{index:06d}"
    n_turns = 2 if rng.random() < MULTI_TURN_FRACTION else 1
    if turns is not None:
        n_turns = turns
    if rng.random() < TEXT_ONLY_FRACTION:
        pairs = rng.sample(text_only_questions(), min(n_turns, 2))
        return {"id": sid, "conversations": _conversation(pairs, False, rng)}, None
    if task == "scenes":
        from pmod.data import scenes

        kinds = None if question_kinds is None else tuple(question_kinds)
        record, image, pairs = scenes.make_record(sid, size, rng, n_turns, kinds)
        return {**record, "conversations": _conversation(pairs, True, rng)}, image
    image, shapes, background = render(size, rng, max_shapes)
    by_type = _questions_about(shapes, rng)
    if question_kinds is not None:
        by_type = {k: v for k, v in by_type.items() if k in question_kinds}
    types = rng.sample(sorted(by_type), min(n_turns, len(by_type)))
    pairs = [rng.choice(by_type[t]) for t in types]
    record = {
        "id": sid,
        "image": f"images/{sid}.png",
        "conversations": _conversation(pairs, True, rng),
        "meta": {
            "background": list(background),
            "shapes": [{"shape": s.kind, "color": s.color, "bbox": list(s.bbox)} for s in shapes],
        },
    }
    return record, image


def generate(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    test_fraction: float = 0.1,
    overwrite: bool = False,
    turns: int | None = None,
    max_shapes: int = MAX_SHAPES,
    question_kinds: Sequence[str] | None = None,
    task: str = "shapes",
) -> tuple[Path, Path]:
    """Write ``n`` samples to ``out_dir``: ``train.json``, ``test.json`` (the last ``round(n * test_fraction)``
    samples) and ``images/*.png``. Image paths in the JSON are relative to ``out_dir`` (the image folder).

    ``task`` is one of :data:`TASKS`: ``shapes`` (this module) or ``scenes`` (:mod:`pmod.data.scenes`, harder).
    ``max_shapes`` (1-3, ``shapes`` only) caps the shapes per image; ``question_kinds`` (a subset of the task's
    :func:`task_question_kinds`; default: all of the shapes task's, the scenes task's ``DEFAULT_KINDS``) limits what
    image questions ask about. One shape per image gives the easiest task: every answer is read off one object (the
    demo asks about its colour and position, see :mod:`pmod.experiments.demo`).

    The set is written to a staging folder inside ``out_dir`` and swapped in when complete (:data:`DATASET_ENTRIES`,
    ``train.json`` last), so a killed run leaves the folder's earlier set whole, never its answers beside new
    images. Other files in ``out_dir`` are left alone. A second writer of the same folder gets a
    :class:`~pmod.core.errors.UserError` (:class:`~pmod.core.files.OutputLock`), as does a path that is a file.

    Raises FileExistsError if ``out_dir`` already holds a data set, unless ``overwrite`` (which replaces it).
    Returns the paths of train.json and test.json.
    """
    _check_settings(n, image_size, test_fraction, max_shapes, question_kinds, task)
    out = check_output_folder(out_dir, "--out")
    with OutputLock(out, "pmod data synth"):
        finish_interrupted_swap(out)
        if any(entry_exists(out / name) for name in DATASET_ENTRIES) and not overwrite:
            raise FileExistsError(f"{out} already holds a data set (train.json, test.json or images/)")
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=PARTIAL_SUFFIX, dir=out))
        try:
            _write_set(staging, n, seed, image_size, test_fraction, turns, max_shapes, question_kinds, task)
            swap_in(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out / "train.json", out / "test.json"


def _check_settings(
    n: int, image_size: int, test_fraction: float, max_shapes: int, question_kinds: Sequence[str] | None, task: str
) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if image_size < 8 * GRID:
        raise ValueError(f"image_size must be >= {8 * GRID}, got {image_size}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    from pmod.data import scenes

    if task == "scenes" and image_size % scenes.GRID:
        raise ValueError(f"image_size of the scenes task must be a multiple of its {scenes.GRID}-cell grid, got "
                         f"{image_size}")  # fmt: skip
    if not 1 <= max_shapes <= MAX_SHAPES:
        raise ValueError(f"max_shapes must be in [1, {MAX_SHAPES}], got {max_shapes}")
    if question_kinds is not None:
        kinds = task_question_kinds(task)
        if set(question_kinds) - set(kinds) or not question_kinds:
            raise ValueError(
                f"question_kinds must be a non-empty subset of {', '.join(kinds)} (the {task} task's kinds); "
                f"got {list(question_kinds)}"
            )


def _write_set(
    folder: Path,
    n: int,
    seed: int,
    image_size: int,
    test_fraction: float,
    turns: int | None,
    max_shapes: int,
    question_kinds: Sequence[str] | None,
    task: str,
) -> None:
    """The data set's entries, written into the (empty) ``folder``."""
    (folder / "images").mkdir()
    rng = random.Random(seed)
    records = []
    for i in range(n):
        record, image = make_sample(i, image_size, rng, turns, max_shapes, question_kinds, task)
        if image is not None:
            image.save(folder / record["image"], format="PNG")
        records.append(record)
    n_test = round(n * test_fraction)
    for name, part in (("train.json", records[: n - n_test]), ("test.json", records[n - n_test :])):
        # One record a line: diffable, and still a plain JSON list.
        (folder / name).write_text("[\n" + ",\n".join(json.dumps(r) for r in part) + "\n]\n", encoding="utf-8")


def patch_labels(image: Image.Image, meta: dict[str, Any], patch_size: int, min_cover: float = 0.1) -> dict[str, Any]:
    """Per-patch targets of an image record, row-major over the ``patch_size`` grid: ``shape`` and ``color`` are
    indices into ``("background",) + SHAPES`` and ``("background",) + sorted(COLORS)``.

    A patch belongs to a shape when at least ``min_cover`` of its pixels have that shape's palette colour (exact,
    since shapes are drawn without anti-aliasing; each shape counts only inside its own box). Returns lists of ints.
    """
    width, height = image.size
    if width % patch_size or height % patch_size:
        raise ValueError(f"image size {image.size} is not a multiple of patch_size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    pixels = np.asarray(image.convert("RGB"))
    colors = ("background", *sorted(COLORS))
    kinds = ("background", *SHAPES)
    shape_ids, color_ids = [0] * (rows * cols), [0] * (rows * cols)
    best = np.zeros(rows * cols)
    for shape in meta["shapes"]:
        inside = np.ones(pixels.shape[:2], dtype=bool)
        if "bbox" in shape:  # shapes of one colour may repeat (scenes): each counts in its own box only
            x0, y0, x1, y1 = shape["bbox"]
            inside[:] = False
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
        mask = (pixels == COLORS[shape["color"]]).all(-1) & inside
        cover = mask.reshape(rows, patch_size, cols, patch_size).mean(axis=(1, 3)).reshape(-1)
        for cell in np.nonzero((cover >= min_cover) & (cover > best))[0]:
            best[cell] = cover[cell]
            color_ids[cell] = colors.index(shape["color"])
            shape_ids[cell] = kinds.index(shape["shape"])
    return {"shape": shape_ids, "color": color_ids, "grid": (rows, cols)}
