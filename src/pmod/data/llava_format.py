"""LLaVA-format conversation data: loading, parsing and validation.

A data file is a JSON list (or JSONL, one object a line) of records::

    {"id": "0001", "image": "coco/1.jpg",            # or a list of paths, or absent for text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Image paths are relative to an image folder. ``<image>`` may stand anywhere in a human turn; the number of
``<image>`` tokens must equal the number of images. Roles ``human``/``user`` and ``gpt``/``assistant`` are accepted,
and an optional first ``system`` turn replaces the system prompt.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from pmod.data.images import ImageError, open_image

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"

ProblemKind = Literal[
    "malformed_json",
    "bad_structure",
    "missing_image",
    "unreadable_image",
    "no_assistant_turn",
    "roles_not_alternating",
    "image_token_mismatch",
]
Role = Literal["system", "user", "assistant"]

_ROLES: dict[str, Role] = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class LlavaFormatError(ValueError):
    """A data file that cannot be read at all (missing, not JSON, not a list of records)."""


@dataclass(frozen=True)
class Turn:
    """One conversation turn with its role normalised to ``system``/``user``/``assistant``."""

    role: Role
    text: str


@dataclass(frozen=True)
class Record:
    """A parsed record: ``images`` are paths as written in the file (relative to the image folder)."""

    id: str | None
    images: tuple[str, ...]
    turns: tuple[Turn, ...]

    @property
    def system(self) -> str | None:
        """The record's own system prompt, if its first turn is a ``system`` turn."""
        return self.turns[0].text if self.turns and self.turns[0].role == "system" else None

    @property
    def dialogue(self) -> tuple[Turn, ...]:
        """The turns without the leading system turn."""
        return self.turns[1:] if self.system is not None else self.turns


@dataclass(frozen=True)
class Problem:
    """One broken record. ``index`` is the record's 0-based position in the file (for JSONL: among non-blank
    lines), ``line`` the 1-based line for JSONL files."""

    index: int
    id: str | None
    kind: ProblemKind
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"record {self.index}" + (f" (id {self.id})" if self.id is not None else "")
        if self.line is not None:
            where += f" line {self.line}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class CheckReport:
    """Outcome of :func:`check_records`."""

    path: Path
    n_records: int = 0
    n_with_images: int = 0
    n_text_only: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no record has a problem."""
        return not self.problems

    def kinds(self) -> Counter[str]:
        """Number of problems of each kind."""
        return Counter(p.kind for p in self.problems)

    def summary(self) -> str:
        """One line: counts of records and problems."""
        bad = len({p.index for p in self.problems})
        line = (
            f"{self.path}: {self.n_records} records ({self.n_with_images} with images, {self.n_text_only} text-only), "
            f"{len(self.problems)} problems in {bad} records"
        )
        if self.problems:
            line += " (" + ", ".join(f"{k}: {n}" for k, n in sorted(self.kinds().items())) + ")"
        return line

    def format(self, max_problems: int | None = None) -> str:
        """The summary line followed by one line per problem (at most ``max_problems``)."""
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        lines = [self.summary(), *(f"  {p}" for p in shown)]
        if len(shown) < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


def iter_raw(path: str | Path) -> Iterator[tuple[int, int | None, Any]]:
    """Yield ``(index, line, obj)`` for each record of a JSON list or JSONL file.

    For JSONL, a line that is not valid JSON yields a :class:`json.JSONDecodeError` as ``obj`` so callers can report it
    and go on. Raises :class:`LlavaFormatError` if the file is missing or is neither a JSON list nor JSONL.
    """
    path = Path(path)
    if not path.is_file():
        raise LlavaFormatError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LlavaFormatError(f"{path}: cannot read: {err}") from err
    stripped = text.lstrip()
    if path.suffix != ".jsonl" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlavaFormatError(f"{path}: not valid JSON ({err})") from err
        for i, obj in enumerate(data):
            yield i, None, obj
        return
    if not stripped.startswith("{") and stripped:
        raise LlavaFormatError(f"{path}: expected a JSON list of records or JSONL (one JSON object a line)")
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            obj = err
        yield index, lineno, obj
        index += 1


def load_records(path: str | Path, *, skip_malformed: bool = False) -> list[dict[str, Any]]:
    """Raw records of a JSON list or JSONL file.

    A malformed JSONL line raises :class:`LlavaFormatError` unless ``skip_malformed``, in which case it is left out
    (so later records' positions shift by one).
    """
    records = []
    for index, line, obj in iter_raw(path):
        if isinstance(obj, json.JSONDecodeError):
            if skip_malformed:
                logger.warning("%s: leaving out line %d (record %d): not valid JSON: %s", path, line, index, obj.msg)
                continue
            raise LlavaFormatError(f"{path}: line {line} (record {index}) is not valid JSON: {obj.msg}")
        records.append(obj)
    return records


def parse_record(obj: Any, index: int = 0, line: int | None = None) -> tuple[Record | None, list[Problem]]:
    """Parse one raw record and check its conversation (not its image files).

    Returns the record (None if its structure is too broken to parse) and the list of problems found.
    """

    def problem(kind: ProblemKind, message: str, rid: str | None = None) -> Problem:
        return Problem(index, rid, kind, message, line)

    if not isinstance(obj, dict):
        return None, [problem("bad_structure", f"record is a {type(obj).__name__}, not an object")]
    rid = None if obj.get("id") is None else str(obj["id"])
    image = obj.get("image")
    if image is None:
        images: tuple[str, ...] = ()
    elif isinstance(image, str):
        images = (image,)
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = tuple(image)
    else:
        return None, [problem("bad_structure", "'image' must be a path or a list of paths", rid)]
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        return None, [problem("bad_structure", "'conversations' must be a non-empty list", rid)]
    turns = []
    for j, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, [problem("bad_structure", f"turn {j} needs a string 'value'", rid)]
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None or (role == "system" and j > 0):
            return None, [problem("bad_structure", f"turn {j} has unknown role {turn.get('from')!r}", rid)]
        turns.append(Turn(role, turn["value"]))
    record = Record(rid, images, tuple(turns))

    problems = []
    roles = [t.role for t in record.dialogue]
    if "assistant" not in roles:
        problems.append(problem("no_assistant_turn", "no gpt (assistant) turn", rid))
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if roles != expected[: len(roles)]:
        problems.append(
            problem("roles_not_alternating", f"roles must alternate human, gpt, ...; got {', '.join(roles)}", rid)
        )
    in_replies = sum(t.text.count(IMAGE_TOKEN) for t in record.turns if t.role == "assistant")
    in_prompts = sum(t.text.count(IMAGE_TOKEN) for t in record.turns if t.role != "assistant")
    if in_replies:
        problems.append(problem("image_token_mismatch", f"{IMAGE_TOKEN} in a gpt turn", rid))
    elif in_prompts != len(images):
        problems.append(
            problem("image_token_mismatch", f"{in_prompts} {IMAGE_TOKEN} tokens but {len(images)} images", rid)
        )
    return record, problems


def resolve_image(path: str, image_folder: str | Path | None) -> Path:
    """Where an image path of a record lives on disk."""
    p = Path(path)
    return p if p.is_absolute() or image_folder is None else Path(image_folder) / p


def check_images(
    record: Record, image_folder: str | Path | None, *, index: int = 0, line: int | None = None, decode: bool = True
) -> list[Problem]:
    """Problems with a record's image files: missing, or unreadable (``decode=False`` only reads the header)."""
    problems = []
    for rel in record.images:
        path = resolve_image(rel, image_folder)
        if not path.is_file():
            problems.append(Problem(index, record.id, "missing_image", f"{path} not found", line))
            continue
        try:
            if decode:
                open_image(path)
            else:
                with Image.open(path) as im:
                    im.verify()
        except (ImageError, OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            problems.append(Problem(index, record.id, "unreadable_image", f"{path}: {err}", line))
    return problems


def check_records(
    path: str | Path, image_folder: str | Path | None = None, *, decode_images: bool = True
) -> CheckReport:
    """Check every record of a LLaVA-format file and report each broken one with its index, id and reason.

    ``image_folder`` defaults to the file's folder. Raises :class:`LlavaFormatError` if the file cannot be read at
    all; problems inside the file (including malformed JSONL lines) go into the report.
    """
    path = Path(path)
    folder = path.parent if image_folder is None else Path(image_folder)
    report = CheckReport(path)
    for index, line, obj in iter_raw(path):
        report.n_records += 1
        if isinstance(obj, json.JSONDecodeError):
            report.problems.append(Problem(index, None, "malformed_json", obj.msg, line))
            continue
        record, problems = parse_record(obj, index, line)
        if record is not None:
            if record.images:
                report.n_with_images += 1
            else:
                report.n_text_only += 1
            problems += check_images(record, folder, index=index, line=line, decode=decode_images)
        report.problems += problems
    return report
