"""`pmod train`: stage-1 (projector) and stage-2 (routed instruction tuning) training on the Hugging Face Trainer.

``pmod train --stage finetune --model DIR --data-path train.json --output-dir OUT [--method M] [Trainer flags]``

* ``--stage pretrain`` trains only the projector (paper: lr 1e-3, batch 256).
* ``--stage finetune`` converts the model with ``--method`` (``pmod`` by default, a method whose config is
  ``trainable``, or ``dense`` for the baseline; the training-free methods have nothing to train) and its
  ``--<method>-<setting>`` flags, then trains the projector, the LLM and the routers; the vision tower stays frozen
  unless ``--vision-lr`` is given.
* ``--recipe paper`` takes the paper's schedule (lr, cosine, warmup 3%, 1 epoch); ``--config recipe.yaml`` supplies
  any flag (keys are the flag names with underscores). Command-line flags win over both.
* Every ``transformers.TrainingArguments`` field is a flag too (``--bf16``, ``--deepspeed``, ...).
* Checkpoints and the final model are written atomically; ``--resume-from-checkpoint auto`` resumes the newest one
  that can be resumed. One run at a time writes an ``--output-dir`` (a lock, released when the run ends or dies).

One run is one :class:`TrainConfig`: pmod's settings as fields, the method's settings, and the Trainer's
``TrainingArguments`` beside them, filled by one parser from the command line, a recipe file or Python::

    from pmod.recipes.train import TrainConfig
    from pmod.recipes.training import train

    train(TrainConfig.from_file("recipes/llava15_7b_pmod.yaml", model="stage1", output_dir="out", max_steps=10))
    train(TrainConfig.from_values({"model": "stage1", "data_path": "d.json", "output_dir": "out", "pmod_beta": 0.3}))

This module only reads and checks the flags (no torch, so ``--help`` and mistakes answer at once); the run itself
is :mod:`pmod.recipes.training`. Also runs as ``python -m pmod.recipes.train ...`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.config import DEFAULT_METHOD, MethodConfig, method_class, method_names
from pmod.core.errors import UserError
from pmod.recipes import method_flags
from pmod.recipes.parsing import CommandParser, dashed
from pmod.recipes.trainer_fields import FALSE, RENAMED, TRUE, check_value, installed_name, trainer_fields

if TYPE_CHECKING:
    from transformers import TrainingArguments


#: Methods ``pmod train`` can train (and so takes flags of): the registry's, by ``MethodConfig.trainable``.
TRAINABLE = tuple(m for m in method_names() if method_class(m).trainable)


class TrainError(UserError):
    """A user error in the training setup (``pmod train`` prints it as one line)."""


MODEL, DATA = "model and stage", "data"


def _setting(default: Any, help: str, group: str = MODEL) -> Any:
    """A field of :class:`TrainConfig` that is also a flag and a recipe key of the same name."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    """One ``pmod train`` run: pmod's own settings (each field is the flag ``--<field>`` and the recipe key
    ``<field>``), the routing method's settings, and the Hugging Face ``TrainingArguments`` beside them.

    Filled by one parser, :meth:`from_values`, from command-line flags, a YAML/JSON recipe or a Python mapping; or
    built directly: ``TrainConfig(model=..., data_path=..., trainer=TrainingArguments(output_dir=...))``."""

    model: str | None = _setting(None, "a LLaVA / LLaVA-NeXT (or routed) model folder")
    llm: str | None = _setting(None, "assemble: a LlamaForCausalLM folder (with tokenizer)")
    vision_tower: str | None = _setting(None, "assemble: a CLIPVisionModel folder")
    projector: str | None = _setting(None, "assemble: projector weights (.bin/.safetensors)")
    stage: str = _setting("finetune", "pretrain (projector only) or finetune")
    vision_lr: float | None = _setting(None, "unfreeze the vision tower with this lr")
    method: str | None = _setting(
        None,
        f"stage-2 routing method: {', '.join(TRAINABLE)} or {method_flags.DENSE} (default: a routed folder's own "
        f"routing, {DEFAULT_METHOD} for a dense one)",
    )
    no_pmod: bool = _setting(False, "finetune the dense baseline (same as --method dense)")
    lora_r: int | None = _setting(None, "train the LLM with LoRA of this rank (needs peft)")
    lora_alpha: int = _setting(16, "LoRA alpha")
    lora_dropout: float = _setting(0.05, "LoRA dropout")
    budget_range: str | None = _setting(None, "LO,HI: train each step at a budget (share of dense's TFLOPs) drawn from "
                                        "this range, so one model serves them all (pmod.recipes.budget_range)")
    data_path: str | None = _setting(None, "LLaVA-format JSON/JSONL training file", DATA)
    image_folder: str | None = _setting(None, "image root; default: the data file's folder", DATA)
    max_length: int = _setting(2048, "tokens per sample; longer ones are truncated", DATA)
    conv_template: str = _setting("auto", "auto, vicuna_v1 or chat_template", DATA)
    on_bad_sample: str = _setting("skip", "skip (count and go on) or error (stop)", DATA)
    group_by_modality_length: bool = _setting(False, "never mix image / text-only batches", DATA)
    #: The method's settings by flag destination (``{"pmod_beta": 0.5}``: the ``--<method>-<setting>`` flags and
    #: recipe keys, generated by :mod:`pmod.recipes.method_flags`).
    method_settings: dict[str, Any] = field(default_factory=dict)
    #: The Hugging Face Trainer's arguments (every field a flag and a recipe key too); required by ``train``.
    trainer: TrainingArguments | None = None

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise TrainError(f"--stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if self.model is None and self.llm is None:
            raise TrainError("give --model DIR, or --llm DIR and --vision-tower DIR to assemble a LLaVA model")
        if self.model is not None and (self.llm or self.vision_tower or self.projector):
            raise TrainError("--model excludes --llm / --vision-tower / --projector")
        if self.llm is not None and self.vision_tower is None:
            raise TrainError("--llm needs --vision-tower")
        if self.no_pmod:
            self.method = method_flags.DENSE
        if self.budget_range is not None:
            self.check_budget_range()

    def check_budget_range(self) -> tuple[float, float]:
        """``--budget-range`` as (LO, HI); a one-line error for a bad range, stage 1 or the dense baseline."""
        from pmod.recipes.budget_range import parse_budget_range  # imports torch: only for runs that use it

        if self.stage != "finetune" or self.method == method_flags.DENSE:
            raise TrainError("--budget-range moves the ratios of trained routed layers: use it with --stage finetune "
                             "and a routed --method (e.g. pmod)")  # fmt: skip
        try:
            return parse_budget_range(self.budget_range)  # type: ignore[arg-type]
        except UserError as err:
            raise TrainError(str(err)) from err

    @property
    def routing_requested(self) -> bool:
        """Whether ``--method`` or a method flag was given (otherwise a routed folder keeps its own routing)."""
        return self.method is not None or bool(self.method_settings)

    def method_config(self) -> MethodConfig | None:
        """The method config of ``--method`` (default p-MoD) and its flags (None: the dense baseline)."""
        try:
            config = method_flags.config_from_values(self.method_settings, self.method or DEFAULT_METHOD)
        except UserError as err:
            raise TrainError(str(err)) from err
        if config is not None and not config.trainable:
            raise TrainError(
                f"{config.method} is training-free: it has nothing to train. Train the dense model "
                f"(--method dense) and apply it afterwards with pmod.convert(model, pmod.{type(config).__name__}(...))."
            )
        return config

    @classmethod
    def from_values(cls, values: Mapping[str, Any], recipe: str | None = None) -> TrainConfig:
        """The one parser: a mapping of flag names (dashes or underscores) to values, text from a command line or
        typed from a recipe file, split into pmod's settings, the method's and the Trainer's; ``recipe="paper"``
        puts the paper's schedule under them. Everything that can be checked without a model is checked here."""
        return _config_from_values(values, recipe)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The config of a YAML/JSON recipe (``recipes/*.yaml``), with ``overrides`` winning over the file."""
        return _config_from_values({**read_recipe(str(path)), **overrides}, None)


#: ``--recipe paper``: the paper's schedule (LLaVA's recipe); batch sizes are global (devices x per device x
#: accumulation), so they are the user's to set: 256 for stage 1, 128 for stage 2.
PAPER_RECIPE: dict[str, dict[str, Any]] = {
    "pretrain": dict(learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1,
                     weight_decay=0.0),
    "finetune": dict(learning_rate=2e-5, lr_scheduler_type="cosine", warmup_steps=0.03, num_train_epochs=1,
                     weight_decay=0.0),
}  # fmt: skip

EPILOG = """\
Defaults are the Hugging Face Trainer's, not the paper's: --recipe paper takes the paper's schedule (stage 1 lr 1e-3,
stage 2 lr 2e-5; cosine, warmup 3%, 1 epoch), and recipes/*.yaml in the repository hold the full runs (--config).

--resume-from-checkpoint auto resumes the newest checkpoint-N in --output-dir that can be resumed (and says which;
a newer broken one, with corrupt weights or no optimizer state, is named and passed over), or says there is none and
the run starts fresh; a path resumes that checkpoint, or is refused if it is broken. Resuming a finished run trains
nothing more and saves its final model again. --output-dir is locked while a run writes it, and a run whose weights
became non-finite or overflowed saves nothing (the last checkpoint stays as it was).

Trainer flags: every transformers.TrainingArguments field is a flag ({count} of them, e.g. --learning-rate,
--per-device-train-batch-size, --gradient-accumulation-steps, --bf16, --activation-checkpointing, --save-steps,
--save-total-limit, --deepspeed, --report-to). `pmod train --help-trainer` lists them with their help.
--activation-checkpointing (transformers 5.24's name) and --gradient-checkpointing (the name before) both work
on every supported transformers.
"""


# ----------------------------------------------------------------------------------------------------------- args
def _parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """A flag for every setting of :class:`TrainConfig`, under its group's heading."""
    hints = typing.get_type_hints(TrainConfig, localns={"TrainingArguments": object})  # not imported: no torch yet
    groups = {name: parser.add_argument_group(name) for name in (MODEL, DATA)}
    for f in dataclasses.fields(TrainConfig):
        if "group" not in f.metadata:
            continue  # the method's settings and the Trainer's have their own flags
        base = next(t for t in (bool, int, float, str) if t is hints[f.name] or t in typing.get_args(hints[f.name]))
        kwargs: dict[str, Any] = {"nargs": "?", "const": True, "type": _parse_bool} if base is bool else {"type": base}
        groups[f.metadata["group"]].add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
            help=f"{f.metadata['help']} (default: {f.default})", **kwargs)  # fmt: skip


def _add_flags(parser: argparse.ArgumentParser) -> None:
    # Defaults are SUPPRESSed so the parsed namespace holds only the flags actually given: those override --config.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "%(prog)s --model DIR --data-path FILE --output-dir DIR [--method METHOD] [--recipe paper] [...]"
    parser.epilog = EPILOG.format(count=len(trainer_fields()))
    run = parser.add_argument_group("recipe")
    run.add_argument("--config", default=argparse.SUPPRESS, help="YAML/JSON recipe; command-line flags win")
    run.add_argument("--recipe", choices=["paper"], default=argparse.SUPPRESS, help="the paper's schedule (see below)")
    run.add_argument("--help-trainer", action="store_true", default=argparse.SUPPRESS,
                     help="list the Trainer's flags with their help and exit")  # fmt: skip
    _add_settings(parser)
    method_flags.add_method_arguments(parser, TRAINABLE, suppress=True)
    trainer = parser.add_argument_group("Trainer (transformers.TrainingArguments; see --help-trainer)")
    # A flag renamed by transformers is taken under both names, whichever this transformers has.
    for name in dict.fromkeys([*trainer_fields(), *RENAMED, *RENAMED.values()]):
        trainer.add_argument(f"--{name.replace('_', '-')}", dest=name, nargs="?", const="true",
                             default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``pmod train`` flags: pmod's own first, the Trainer's under one heading."""
    _add_flags(parser)


def trainer_help() -> str:
    """Every Trainer flag with its help, one per line."""
    return "\n".join(f"  --{f.name.replace('_', '-'):38} {f.help[:110]}" for f in trainer_fields().values())


def read_recipe(path: str) -> dict[str, Any]:
    """The settings of a YAML/JSON recipe file (keys are flag names with underscores); a one-line
    :class:`TrainError` when it cannot be read or holds no mapping."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except (OSError, ValueError) as err:
        raise TrainError(f"cannot read --config {path}: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise TrainError(f"{path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _config_from_values(values: Mapping[str, Any], recipe: str | None) -> TrainConfig:
    merged = {installed_name(k.replace("-", "_")): v for k, v in values.items()}
    recipe = merged.pop("recipe", None) or recipe
    if recipe not in (None, "paper"):
        raise TrainError(f"unknown recipe {recipe!r}; the one recipe is 'paper'")
    settings = {key: merged.pop(key) for key in list(method_flags.given_method_flags(merged))}
    own = {f.name for f in dataclasses.fields(TrainConfig) if "group" in f.metadata}
    fields = trainer_fields()
    unknown = sorted(set(merged) - own - set(fields))
    if unknown:
        raise TrainError(f"unknown settings {unknown}; `pmod train --help` lists the flags")
    for key in sorted(set(merged) & set(fields)):
        problem = check_value(fields[key], merged[key])
        if problem:
            raise TrainError(f"--{key.replace('_', '-')} {problem}")
    try:
        config = TrainConfig(**{k: v for k, v in merged.items() if k in own}, method_settings=settings)
    except TypeError as err:
        raise TrainError(str(err)) from err
    if config.stage == "finetune":
        config.method_config()  # a bad method or setting fails here, before any model is loaded
    trainer = {k: v for k, v in merged.items() if k in fields}
    if recipe == "paper":
        trainer = {**PAPER_RECIPE[config.stage], **trainer}
    config.trainer = training_arguments(trainer)
    return config


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """The config of the flags given on a command line (defaults are suppressed, so only those), over the
    ``--config`` file's settings, over the ``--recipe``."""
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_") and k not in ("command", "config")}
    merged = read_recipe(ns.config) if getattr(ns, "config", None) else {}
    return _config_from_values({**merged, **given}, None)


def training_arguments(values: dict[str, Any]) -> TrainingArguments:
    """``TrainingArguments`` of flag values (text from the command line, typed values from a recipe file)."""
    from transformers import HfArgumentParser, TrainingArguments

    text = {k: v for k, v in values.items() if isinstance(v, str)}
    typed = {k: v for k, v in values.items() if not isinstance(v, str)}
    typed.setdefault("output_dir", text.pop("output_dir", "trainer_output"))  # a recipe needs a deliberate place
    tokens = [token for k, v in text.items() for token in (f"--{k}", v)]
    try:
        (from_text,) = HfArgumentParser((TrainingArguments,)).parse_args_into_dataclasses(
            args=tokens, look_for_args_file=False
        )
        parsed = {k: getattr(from_text, k) for k in text}
        (targs,) = HfArgumentParser((TrainingArguments,)).parse_dict({**typed, **parsed})
    except SystemExit as err:  # argparse inside HfArgumentParser rejected a value
        raise TrainError(f"a Trainer flag has a value transformers cannot read: {' '.join(tokens)}") from err
    except (ValueError, TypeError) as err:
        raise TrainError(" ".join(str(err).split())) from err
    return targs


def parse_args(argv: list[str]) -> TrainConfig:
    """The :class:`TrainConfig` of ``pmod train`` flags (and ``--config`` / ``--recipe``)."""
    parser = CommandParser(prog="pmod train", allow_abbrev=False)
    _add_flags(parser)
    return config_from_namespace(parser.parse_args([dashed(a) for a in argv]))


# ------------------------------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    """``pmod train``: parse the given flags and ``--config``, then train."""
    if getattr(args, "help_trainer", False):
        print(trainer_help())
        return 0
    config = config_from_namespace(args)
    from pmod.recipes.training import train

    train(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pmod.recipes.train`` (e.g. under torchrun)."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = CommandParser(prog="pmod train", allow_abbrev=False)
    _add_flags(parser)
    try:
        return run(parser.parse_args([dashed(a) for a in (sys.argv[1:] if argv is None else argv)]))
    except UserError as err:
        print(f"pmod train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
