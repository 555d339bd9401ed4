"""The synthetic shapes set as lmms-eval tasks: the image questions of ``test.json`` in the folder
``pmod data synth`` wrote, read locally (no hub).

Each document is the first question of an image record and its one-word answer, as ``pmod demo`` scores them:
``pmod_shapes`` generates and counts an exact match of the first answer word (case-insensitive);
``pmod_shapes_mc`` scores the answers the question allows (the colours, left/right, ...) by log-likelihood.
The folder is ``$PMOD_SHAPES_DIR`` (``pmod eval --shapes-data`` sets it), else ``data/shapes``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmms_eval.api.task import ConfigurableTask

from pmod.data import scenes, synth

#: The environment variable that names the data folder.
ENV = "PMOD_SHAPES_DIR"
DEFAULT_FOLDER = "data/shapes"

#: The answers each question kind allows (the multiple-choice options).
CHOICES: dict[str, list[str]] = {
    "color": list(synth.COLORS),
    "shape": list(synth.SHAPES),
    "position": ["left", "right"],
    "count": list(synth.NUMBERS[1 : synth.MAX_SHAPES + 1]),
    "exists": ["yes", "no"],
}


def _scene_choices() -> dict[str, list[str]]:
    """Per kind, the answers the scenes task's questions of that kind can have, in the generator's order; ``half``
    is left out (its two words depend on the question, :func:`choices`)."""
    answers: dict[str, dict[str, None]] = {}
    for question, answer in scenes.image_questions():
        answers.setdefault(scenes.question_kind(question), {})[answer] = None
    return {kind: list(words) for kind, words in answers.items() if kind != "half"}


#: The same for a scenes set (``pmod data synth --task scenes``).
SCENE_CHOICES: dict[str, list[str]] = _scene_choices()


def choices(question: str, kind: str, scene: bool) -> list[str]:
    """The answers a question of ``kind`` allows, as the multiple-choice options (``scene``: a scenes set)."""
    if scene and kind == "half":
        return next((list(pair[:2]) for words, pair in scenes.HALVES.items() if words in question), [])
    return (SCENE_CHOICES if scene else CHOICES).get(kind, [])


def data_folder() -> Path:
    """The shapes folder the tasks read: ``$PMOD_SHAPES_DIR``, else ``./data/shapes``."""
    return Path(os.environ.get(ENV) or DEFAULT_FOLDER).expanduser().resolve()


def documents(folder: Path) -> list[dict[str, Any]]:
    """One document per image record of ``folder/test.json``: its first question, answer, kind, options and image
    path (absolute, so the documents do not depend on the working directory)."""
    test = folder / "test.json"
    if not test.is_file():
        raise FileNotFoundError(
            f"pmod_shapes: {test} does not exist; write the set with `pmod data synth --out {folder}` or point "
            f"{ENV} (pmod eval: --shapes-data) at the folder it wrote."
        )
    docs = []
    for record in json.loads(test.read_text(encoding="utf-8")):
        if not record.get("image"):
            continue  # text-only questions: the demo and these tasks score questions about an image
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        answer = record["conversations"][1]["value"].strip()
        kind = synth.question_kind(question)
        scene = any("cell" in s for s in record.get("meta", {}).get("shapes", []))
        options = choices(question, kind, scene)
        options = options if answer in options else [*options, answer]  # an edited set may answer otherwise
        docs.append({
            "id": record["id"], "question": question, "answer": answer, "kind": kind, "choices": options,
            "image": str(folder / record["image"]),
        })  # fmt: skip
    return docs


class ShapesTask(ConfigurableTask):
    """A YAML-configured task whose documents come from :func:`documents` instead of a hub dataset."""

    def __init__(self, config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # lmms-eval hands the whole YAML, "class" included, which TaskConfig does not take.
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs: dict[str, Any] | None = None) -> None:
        import datasets

        self.dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(documents(data_folder()))})
        self.dataset_no_image = self.dataset  # images are paths, opened in doc_to_visual


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from pmod.data.images import open_image

    return [open_image(doc["image"])]


def doc_to_text(doc: dict[str, Any]) -> str:
    return doc["question"]


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answer"]


def doc_to_choice(doc: dict[str, Any]) -> list[str]:
    return list(doc["choices"])


def doc_to_choice_index(doc: dict[str, Any]) -> int:
    return list(doc["choices"]).index(doc["answer"])


def first_word_match(answer: str, truth: str) -> float:
    """1.0 when the first word of ``answer`` is ``truth`` (case-insensitive), the demo's score."""
    words = answer.strip().split()
    return float(bool(words) and words[0].lower() == truth.lower())


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": first_word_match(results[0], doc["answer"])}
