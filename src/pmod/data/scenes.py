"""A harder synthetic task: cluttered scenes of 3-8 small shapes, questions whose answers need many vision tokens.

The easy task of :mod:`pmod.data.synth` puts one shape in front of a plain background and asks about it: a few
tokens carry the whole answer, so every method that keeps those tokens scores alike. Here each image holds
:data:`MIN_SHAPES` to :data:`MAX_SHAPES` shapes, kinds and colours repeated, each inside one cell of an 8 x 8 grid
(one cell per patch at 8 px patches on a 64 px image: a shape is the fine detail of one patch), on a background
with grey speckle (the clutter). The questions:

- ``count``: how many shapes there are (3-8: every shape token counts);
- ``most_color`` / ``most_shape``: the colour / kind most shapes have (asked only where one has the most);
- ``half``: whether more shapes lie in the left or the right half (the top or the bottom; asked only where the
  halves differ);
- ``count_color`` / ``count_shape``: how many shapes of a colour / of a kind (distractors around them);
- ``exists``: whether a shape of a named colour and kind is there (present and absent equally often);
- ``relation``: whether one named shape is left of (or above) another, both named by colour and kind;
- ``cell``: the colour of the shape in a named row and column of the grid.

Answers are one word. Records carry ``meta`` like :mod:`pmod.data.synth`'s (background, each shape's kind,
colour, inclusive pixel bbox) plus each shape's ``cell`` ``[row, column]``. Output is deterministic: the same
random generator state gives the same record and image.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from PIL import Image, ImageDraw

from pmod.data.synth import BACKGROUNDS, COLORS, SHAPES, draw_shape

#: Cells per side of the scene grid.
GRID = 8
MIN_SHAPES, MAX_SHAPES = 3, 8
#: Question kinds of the scenes task, the keys ``question_kinds`` picks from.
QUESTION_KINDS: tuple[str, ...] = (
    "cell", "count", "count_color", "count_shape", "exists", "half", "most_color", "most_shape", "relation",
)  # fmt: skip
#: The kinds ``pmod data synth --task scenes`` asks by default (the demo asks two of them, count and half:
#: ``pmod.experiments.demo.TASK_DEFAULTS``). Measured on the demo's model (BENCHMARKS.md, issue 24): with this mix,
#: after 1000 steps (4x the demo's), the trained dense model reads the counts late, so keeping a quarter of the vision
#: tokens from layer 2 costs it 20-28 points (1.5-3.5 at the demo's 250 steps); ``cell``, ``relation``,
#: ``most_color`` and ``most_shape`` stayed at their priors within 500 steps.
DEFAULT_KINDS: tuple[str, ...] = ("count", "count_color", "exists", "half")
HALVES: dict[str, tuple[str, str, int]] = {  # the question's two words, and the cell axis (0 = row)
    "left or right": ("left", "right", 1),
    "top or bottom": ("top", "bottom", 0),
}
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
PLURALS: dict[str, str] = {k: f"{k}s" for k in SHAPES}
RELATIONS: dict[str, int] = {"left of": 1, "above": 0}  # the relation and the cell axis it compares (0 = row)
#: Speckle: grey dots a shade off the background, on this share of the background cells.
CLUTTER_FRACTION = 0.3


def _speckle(draw: ImageDraw.ImageDraw, cell: int, free: list[int], background: tuple[int, int, int],
             rng: random.Random) -> None:  # fmt: skip
    shade = 40 if background[0] < 128 else -40  # never a palette colour: the greys stay greys
    grey = tuple(v + shade for v in background)
    for c in free:
        if rng.random() < CLUTTER_FRACTION:
            x, y = (c % GRID) * cell + rng.randrange(cell - 1), (c // GRID) * cell + rng.randrange(cell - 1)
            draw.rectangle((x, y, x + 1, y + 1), fill=grey)


def render(size: int, rng: random.Random) -> tuple[Image.Image, list[dict[str, Any]], tuple[int, int, int]]:
    """A scene: 3-8 shapes in distinct grid cells (kinds and colours drawn with repeats), grey speckle in some empty
    cells. Returns the image, the shapes' meta records and the background colour."""
    cell = size // GRID
    n = rng.randint(MIN_SHAPES, MAX_SHAPES)
    cells = rng.sample(range(GRID * GRID), n)
    background = rng.choice(BACKGROUNDS)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    _speckle(draw, cell, sorted(set(range(GRID * GRID)) - set(cells)), background, rng)
    shapes = []
    for c in cells:
        kind, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
        extent = rng.randint(max(3, cell * 5 // 8), cell - 1)
        x0 = (c % GRID) * cell + rng.randint(0, cell - extent)
        y0 = (c // GRID) * cell + rng.randint(0, cell - extent)
        bbox = (x0, y0, x0 + extent - 1, y0 + extent - 1)
        draw_shape(draw, kind, bbox, COLORS[color])
        shapes.append({"shape": kind, "color": color, "bbox": list(bbox), "cell": [c // GRID, c % GRID]})
    return image, shapes, background


def _relation_questions(shapes: list[dict[str, Any]], rng: random.Random) -> list[tuple[str, str]]:
    named = Counter((s["color"], s["shape"]) for s in shapes)
    unique = [s for s in shapes if named[(s["color"], s["shape"])] == 1]
    if len(unique) < 2:
        return []
    a, b = rng.sample(unique, 2)
    relation, axis = rng.choice(sorted(RELATIONS.items()))
    if a["cell"][axis] == b["cell"][axis]:
        return []  # neither: the question would have no one-word answer
    answer = "yes" if a["cell"][axis] < b["cell"][axis] else "no"
    return [(f"Is the {a['color']} {a['shape']} {relation} the {b['color']} {b['shape']}?", answer)]


def _exists_question(shapes: list[dict[str, Any]], rng: random.Random) -> tuple[str, str]:
    present = sorted({(s["color"], s["shape"]) for s in shapes})
    absent = sorted({(c, k) for c in COLORS for k in SHAPES} - set(present))
    color, kind = rng.choice(present if rng.random() < 0.5 else absent)
    return f"Is there a {color} {kind}?", "yes" if (color, kind) in present else "no"


def _most_question(shapes: list[dict[str, Any]], key: str, question: str) -> list[tuple[str, str]]:
    (first, n), *rest = Counter(s[key] for s in shapes).most_common()
    return [(question, first)] if not rest or rest[0][1] < n else []


def _half_question(shapes: list[dict[str, Any]], rng: random.Random) -> list[tuple[str, str]]:
    words, (low, high, axis) = rng.choice(sorted(HALVES.items()))
    n_low = sum(s["cell"][axis] < GRID // 2 for s in shapes)
    if 2 * n_low == len(shapes):
        return []
    return [(f"Are there more shapes on the {words}?", low if 2 * n_low > len(shapes) else high)]


def questions_about(shapes: list[dict[str, Any]], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Question/answer pairs about a scene, grouped by kind (kinds with no question for this scene left out)."""
    color = rng.choice(sorted(COLORS))
    kind = rng.choice(SHAPES)
    target = rng.choice(shapes)
    row, column = target["cell"]
    qa = {
        "count": [("How many shapes are there?", NUMBERS[len(shapes)])],
        "count_color": [(f"How many {color} shapes are there?", NUMBERS[sum(s["color"] == color for s in shapes)])],
        "count_shape": [(f"How many {PLURALS[kind]} are there?", NUMBERS[sum(s["shape"] == kind for s in shapes)])],
        "cell": [(f"What color is the shape in row {NUMBERS[row + 1]}, column {NUMBERS[column + 1]}?",
                  target["color"])],  # fmt: skip
        "exists": [_exists_question(shapes, rng)],
        "most_color": _most_question(shapes, "color", "What color do most shapes have?"),
        "most_shape": _most_question(shapes, "shape", "Which shape is most common?"),
        "half": _half_question(shapes, rng),
        "relation": _relation_questions(shapes, rng),
    }
    return {k: v for k, v in qa.items() if v}


def image_questions() -> list[tuple[str, str]]:
    """Every question a scene can get, with every answer it can have (for the vocabulary)."""
    counts = [("How many shapes are there?", n) for n in NUMBERS[MIN_SHAPES : MAX_SHAPES + 1]]
    counts += [(f"How many {c} shapes are there?", n) for c in COLORS for n in NUMBERS]
    counts += [(f"How many {p} are there?", n) for p in PLURALS.values() for n in NUMBERS]
    cells = [(f"What color is the shape in row {NUMBERS[r]}, column {NUMBERS[c]}?", color)
             for r in range(1, GRID + 1) for c in range(1, GRID + 1) for color in COLORS]  # fmt: skip
    relations = [(f"Is the {c} {k} {rel} the {c} {k}?", a) for c in COLORS for k in SHAPES for rel in RELATIONS
                 for a in ("yes", "no")]  # fmt: skip
    exists = [(f"Is there a {c} {k}?", a) for c in COLORS for k in SHAPES for a in ("yes", "no")]
    most = [("What color do most shapes have?", c) for c in COLORS]
    most += [("Which shape is most common?", k) for k in SHAPES]
    halves = [(f"Are there more shapes on the {words}?", a) for words, ans in HALVES.items() for a in ans[:2]]
    return counts + cells + exists + relations + most + halves


_KIND_PATTERNS = (
    ("count", "how many shapes are"),
    ("count_color", "shapes are there"),
    ("count_shape", "s are there?"),
    ("cell", "in row"),
    ("exists", "is there a"),
    ("most_color", "most shapes have"),
    ("most_shape", "most common"),
    ("half", "more shapes on the"),
    ("relation", "left of the"),
    ("relation", "above the"),
)


def question_kind(question: str) -> str | None:
    """The :data:`QUESTION_KINDS` entry of a scenes question, None for a question of another task."""
    text = question.lower()
    return next((kind for kind, pattern in _KIND_PATTERNS if pattern in text), None)


def make_record(
    sid: str, size: int, rng: random.Random, n_turns: int, question_kinds: tuple[str, ...] | None
) -> tuple[dict[str, Any], Image.Image, list[tuple[str, str]]]:
    """A scene's image, its meta (``background``, ``shapes``) and ``n_turns`` question/answer pairs of distinct
    kinds (from ``question_kinds``, default :data:`DEFAULT_KINDS`)."""
    while True:  # a scene with no question of the chosen kinds (no two uniquely named shapes) is drawn again
        image, shapes, background = render(size, rng)
        by_kind = questions_about(shapes, rng)
        by_kind = {k: v for k, v in by_kind.items() if k in (question_kinds or DEFAULT_KINDS)}
        if by_kind:
            break
    kinds = rng.sample(sorted(by_kind), min(n_turns, len(by_kind)))
    meta = {"background": list(background), "shapes": shapes}
    return {"id": sid, "image": f"images/{sid}.png", "meta": meta}, image, [rng.choice(by_kind[k]) for k in kinds]
