"""Stage-1 (projector pre-training) and stage-2 (routed instruction tuning) recipe on the Hugging Face Trainer.

``pmod train --stage finetune --model DIR --data-path train.json --output-dir OUT [--method M] [TrainingArguments]``

* ``--stage pretrain`` trains only the projector (paper: lr 1e-3, batch 256).
* ``--stage finetune`` converts the model with ``--method`` (``pmod`` by default, ``mod``, ``gamma_mod``, or
  ``dense`` for the baseline; FastV is training-free) and its ``--<method>-<setting>`` flags, then trains the
  projector, the LLM and the routers; the vision tower stays frozen unless ``--vision-lr`` is given.
* ``--config recipe.yaml`` supplies any flag (keys are the flag names with underscores); flags given on the command
  line win over the file.
* Checkpoints are written to ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete, so a run killed
  while saving never leaves a half-written ``checkpoint-N`` behind; ``--resume-from-checkpoint auto`` picks the
  last complete one.
* On logging steps, routing statistics are logged with the loss (``pmod/...`` keys), with gamma-MoD's routing loss
  and the count of skipped non-finite losses.

Also runs as ``python -m pmod.recipes.train ...`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import transformers
from torch import nn
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from pmod.core.backbone import backbone_for
from pmod.core.config import MethodConfig, method_names, stored_method_config
from pmod.core.convert import convert, get_method_config, is_routed_model, load
from pmod.core.errors import UserError
from pmod.io.importers.llava_parts import assemble_llava
from pmod.recipes import method_flags
from pmod.recipes.trainer import PModTrainer, clean_staging

logger = logging.getLogger(__name__)


class TrainError(UserError):
    """A user error in the training setup (``pmod train`` prints it as one line)."""


@dataclass
class ModelArguments:
    """Which model to start from, which stage to run and which routing method stage 2 trains."""

    model: str | None = field(default=None, metadata={"help": "a LLaVA / LLaVA-NeXT (or routed) model folder"})
    llm: str | None = field(default=None, metadata={"help": "assemble: a LlamaForCausalLM folder (with tokenizer)"})
    vision_tower: str | None = field(default=None, metadata={"help": "assemble: a CLIPVisionModel folder"})
    projector: str | None = field(default=None, metadata={"help": "assemble: projector weights (.bin/.safetensors)"})
    stage: str = field(default="finetune", metadata={"help": "pretrain (projector only) or finetune"})
    vision_lr: float | None = field(default=None, metadata={"help": "unfreeze the vision tower with this lr"})
    method: str = field(default="pmod", metadata={"help": "stage-2 routing method: pmod, mod, gamma_mod or dense"})
    no_pmod: bool = field(default=False, metadata={"help": "finetune the dense baseline (same as --method dense)"})
    lora_r: int | None = field(default=None, metadata={"help": "train the LLM with LoRA of this rank (needs peft)"})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    #: ``--<method>-<setting>`` values (generated flags, see ``pmod.recipes.method_flags``).
    method_settings: dict[str, Any] = field(default_factory=dict, init=False)

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

    def method_config(self) -> MethodConfig | None:
        """The method config of ``--method`` and its flags (None: the dense baseline)."""
        try:
            config = method_flags.config_from_values(self.method_settings, self.method)
        except UserError as err:
            raise TrainError(str(err)) from err
        if config is not None and not config.trainable:
            raise TrainError(
                f"{config.method} is training-free: it has nothing to train. Train the dense model "
                f"(--method dense) and apply it afterwards with pmod.convert(model, pmod.FastVConfig(...))."
            )
        return config


@dataclass
class DataArguments:
    """The LLaVA-format training data."""

    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON/JSONL training file"})
    image_folder: str | None = field(default=None, metadata={"help": "image root; default: the data file's folder"})
    max_length: int = 2048
    conv_template: str = field(default="auto", metadata={"help": "auto, vicuna_v1 or chat_template"})
    on_bad_sample: str = field(default="skip", metadata={"help": "skip or error"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "never mix image / text-only batches"})


ARG_CLASSES = (ModelArguments, DataArguments, TrainingArguments)
#: Methods ``pmod train`` can train (and so takes flags of).
TRAINABLE = tuple(m for m in method_names() if m != "fastv")


# ----------------------------------------------------------------------------------------------------------- args
def _add_flags(parser: argparse.ArgumentParser) -> None:
    # Defaults are SUPPRESSed so the parsed namespace holds only the flags actually given: those override --config.
    hf = HfArgumentParser(ARG_CLASSES)
    parser.add_argument("--config", default=argparse.SUPPRESS, help="YAML/JSON recipe; command-line flags win")
    for action in hf._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        action = copy.copy(action)
        action.default = argparse.SUPPRESS
        action.required = False
        parser._add_action(action)
    method_flags.add_method_arguments(parser, TRAINABLE, suppress=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``pmod train`` flags (ModelArguments, DataArguments, TrainingArguments, method settings,
    ``--config``)."""
    _add_flags(parser)


def _read_config(path: str) -> dict[str, Any]:
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise TrainError(f"{path} must hold a mapping of flag names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def args_from_namespace(ns: argparse.Namespace) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Build the three argument dataclasses from a namespace of given flags (plus the ``--config`` file)."""
    given = {k: v for k, v in vars(ns).items() if not k.startswith("_") and k not in ("command", "config")}
    merged: dict[str, Any] = {}
    if getattr(ns, "config", None):
        try:
            merged.update(_read_config(ns.config))
        except (OSError, ValueError) as err:
            raise TrainError(f"cannot read --config {ns.config}: {err}") from err
    merged.update(given)
    settings = {key: merged.pop(key) for key in list(method_flags.given_method_flags(merged))}
    known = {f.name for cls in ARG_CLASSES for f in fields(cls) if f.init}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise TrainError(f"unknown settings {unknown}")
    # HF defaults this to "trainer_output"; a recipe needs a deliberate place.
    merged.setdefault("output_dir", "trainer_output")
    try:
        margs, dargs, targs = HfArgumentParser(ARG_CLASSES).parse_dict(merged)
    except TrainError:
        raise
    except (ValueError, TypeError) as err:
        raise TrainError(str(err)) from err
    margs.method_settings = settings
    if margs.stage == "finetune":
        margs.method_config()  # a bad method or setting fails here, before any model is loaded
    return margs, dargs, targs


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``pmod train`` flags (and ``--config``) into (ModelArguments, DataArguments, TrainingArguments)."""
    parser = argparse.ArgumentParser(prog="pmod train")
    _add_flags(parser)
    return args_from_namespace(parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------------------- model
def _architecture(folder: str) -> type:
    config = transformers.AutoConfig.from_pretrained(folder)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise TrainError(f"{folder} has no known architecture in its config.json ({archs})")
    return cls


def build_model(margs: ModelArguments, method_config: MethodConfig | None = None) -> tuple[nn.Module, Any]:
    """Load or assemble the model and processor, convert it for stage 2 (with ``method_config``, or the one of
    ``--method``) and set what trains."""
    if margs.model is not None:
        if not (Path(margs.model) / "config.json").is_file():
            raise TrainError(f"--model {margs.model} has no config.json")
        cls = _architecture(margs.model)
        config = transformers.AutoConfig.from_pretrained(margs.model)
        stored = stored_method_config(config)
        model = load(margs.model) if stored is not None else cls.from_pretrained(margs.model)
        processor = transformers.AutoProcessor.from_pretrained(margs.model)
    else:
        model, processor = assemble_llava(margs.llm, margs.vision_tower, margs.projector)  # type: ignore[arg-type]

    if margs.stage == "finetune":
        wanted = method_config if method_config is not None else margs.method_config()
        if is_routed_model(model):
            logger.info("model is already routed (%s); keeping its routing", get_method_config(model))
        elif wanted is not None:
            convert(model, wanted)
    set_trainable(model, margs.stage, train_vision=margs.vision_lr is not None)
    model.config.use_cache = False
    return model, processor


def set_trainable(model: nn.Module, stage: str, train_vision: bool = False) -> None:
    """Stage 1: only the projector trains. Stage 2: everything but the vision tower (unless ``train_vision``)."""
    adapter = backbone_for(model)
    for name, param in model.named_parameters():
        if stage == "pretrain":
            param.requires_grad_(adapter.is_projector_parameter(name))
        else:
            param.requires_grad_(train_vision or not adapter.is_vision_parameter(name))


def _apply_lora(model: nn.Module, margs: ModelArguments) -> nn.Module:
    try:
        import peft
    except ImportError as err:
        raise TrainError("--lora-r needs peft: pip install peft") from err
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    # Routers and projector are new / small: train them fully rather than through low-rank adapters.
    config = peft.LoraConfig(
        r=margs.lora_r,
        lora_alpha=margs.lora_alpha,
        lora_dropout=margs.lora_dropout,
        target_modules=targets,
        modules_to_save=["multi_modal_projector", "router", "gamma_mod_router"],
    )
    return peft.get_peft_model(model, config)


# ------------------------------------------------------------------------------------------------------------ run
def train(
    margs: ModelArguments,
    dargs: DataArguments,
    targs: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
    method_config: MethodConfig | None = None,
) -> PModTrainer:
    """Run one training stage and save the final model and processor to ``targs.output_dir``; returns the
    trainer (its ``state.log_history`` holds the logs). ``method_config`` overrides ``--method`` for stage 2."""
    from pmod.data.batching import LlavaCollator
    from pmod.data.dataset import LlavaDataset

    if dargs.data_path is None:
        raise TrainError("--data-path is required")
    if not Path(dargs.data_path).is_file():
        raise TrainError(f"--data-path {dargs.data_path} not found")
    if method_config is not None and not method_config.trainable:
        raise TrainError(f"{method_config.method} is training-free: it has nothing to train.")
    transformers.set_seed(targs.seed)
    model, processor = build_model(margs, method_config)
    if margs.lora_r:
        model = _apply_lora(model, margs)
    if targs.gradient_checkpointing:
        targs.gradient_checkpointing_kwargs = targs.gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    targs.remove_unused_columns = False  # the collator's keys are the model's inputs; keep image_sizes etc.
    dataset = LlavaDataset(
        dargs.data_path,
        processor,
        image_folder=dargs.image_folder,
        max_length=dargs.max_length,
        conv_template=dargs.conv_template,  # type: ignore[arg-type]
        on_bad_sample=dargs.on_bad_sample,  # type: ignore[arg-type]
    )
    trainer = PModTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=LlavaCollator.from_tokenizer(processor.tokenizer),
        processing_class=processor,
        callbacks=callbacks,
        group_by_modality=dargs.group_by_modality_length,
        vision_lr=margs.vision_lr,
    )
    resume: str | bool | None = targs.resume_from_checkpoint
    if resume == "auto":
        resume = get_last_checkpoint(targs.output_dir) if os.path.isdir(targs.output_dir) else None
        logger.info("resuming from %s", resume or "scratch (no checkpoint found)")
    elif resume is not None and not os.path.isdir(resume):
        raise TrainError(f"--resume-from-checkpoint {resume} is not a folder")
    if trainer.args.should_save:
        clean_staging(targs.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    if margs.lora_r:
        trainer.model = trainer.model.merge_and_unload()  # a plain (routed) model folder for pmod.load / generate
    trainer.model.config.use_cache = True
    trainer.save_model(targs.output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(targs.output_dir)
    trainer.accelerator.wait_for_everyone()
    return trainer


def run(args: argparse.Namespace) -> int:
    """``pmod train``: parse the given flags and ``--config``, then train."""
    margs, dargs, targs = args_from_namespace(args)
    train(margs, dargs, targs)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pmod.recipes.train`` (e.g. under torchrun)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        margs, dargs, targs = parse_args(sys.argv[1:] if argv is None else argv)
        train(margs, dargs, targs)
    except UserError as err:
        print(f"pmod train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
