"""The Hugging Face Trainer's flags, known without importing transformers: the fields of ``TrainingArguments`` are
read from its source file's syntax tree, so ``pmod train --help`` and flag errors answer before torch loads.

Values of scalar fields (int, float, bool) are checked here too; the rest is typed by transformers' own
``HfArgumentParser`` once the flags are known to be right.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
#: Trainer flags transformers 5.24 renamed (new name: old name); the old names stay deprecated aliases until v6.
RENAMED = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


@dataclass(frozen=True)
class TrainerField:
    """One ``TrainingArguments`` field: its name, the annotation as written, and its help text."""

    name: str
    annotation: str
    help: str

    @property
    def kind(self) -> str:
        """``"bool"``, ``"int"``, ``"float"`` or ``"other"``: what the flag's value must read as."""
        words = set(re.findall(r"[A-Za-z_]+", self.annotation)) - {"Optional", "None", "Union"}
        return next(iter(words)) if len(words) == 1 and words <= {"bool", "int", "float"} else "other"


@functools.lru_cache(maxsize=1)
def trainer_fields() -> dict[str, TrainerField]:
    """The fields of ``transformers.TrainingArguments`` by name; from the source when it can be read, else from the
    imported class (slower, same answer)."""
    spec = importlib.util.find_spec("transformers")
    if spec is not None and spec.origin:
        source = Path(spec.origin).parent / "training_args.py"
        try:
            fields = _fields_from_source(source.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, StopIteration):
            fields = {}
        if fields:
            return fields
    import dataclasses

    from transformers import TrainingArguments

    return {
        f.name: TrainerField(f.name, str(f.type), str(f.metadata.get("help", "")))
        for f in dataclasses.fields(TrainingArguments)
        if f.init
    }


def installed_name(name: str) -> str:
    """The name the installed ``TrainingArguments`` reads a flag under: a renamed flag, given by either name, goes
    to its new name where that exists and to its old one before 5.24; other names are returned as they are."""
    new = next((n for n, old in RENAMED.items() if name in (n, old)), None)
    if new is None:
        return name
    return new if new in trainer_fields() else RENAMED[new]


def _fields_from_source(text: str) -> dict[str, TrainerField]:
    tree = ast.parse(text)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments")
    out = {}
    for stmt in cls.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        if name.startswith("_") or "ClassVar" in ast.unparse(stmt.annotation):
            continue
        out[name] = TrainerField(name, ast.unparse(stmt.annotation), _help(stmt.value))
    return out


def _help(value: ast.expr | None) -> str:
    """The ``metadata={"help": ...}`` of a ``field(...)`` call, when it is a literal."""
    if not isinstance(value, ast.Call):
        return ""
    for keyword in value.keywords:
        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
            for key, item in zip(keyword.value.keys, keyword.value.values):
                if isinstance(key, ast.Constant) and key.value == "help":
                    try:
                        return " ".join(str(ast.literal_eval(item)).split())
                    except ValueError:
                        return ""
    return ""


def check_value(field: TrainerField, value: object) -> str | None:
    """Why ``value`` cannot be this field's value (None when it can, or when transformers decides later)."""
    if value is None or not isinstance(value, str) or field.kind == "other":
        return None
    text = value.strip().lower()
    if field.kind == "bool":
        return None if text in TRUE + FALSE else f"is true or false, not {value!r}"
    try:
        (int if field.kind == "int" else float)(text)
    except ValueError:
        return f"is a number ({field.kind}), not {value!r}"
    return None
