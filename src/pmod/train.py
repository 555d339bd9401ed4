"""Stage-1 (projector pre-training) and stage-2 (p-MoD instruction tuning) recipe on the Hugging Face Trainer.

``pmod train --stage finetune --model DIR --data-path train.json --output-dir OUT [TrainingArguments flags]``

* ``--stage pretrain`` trains only ``multi_modal_projector`` (paper: lr 1e-3, batch 256).
* ``--stage finetune`` converts the model to p-MoD (``--pmod-*`` flags, or ``--no-pmod`` for the dense baseline) and
  trains the projector, the LLM and the routers; the vision tower stays frozen unless ``--vision-lr`` is given.
* ``--config recipe.yaml`` supplies any flag (keys are the flag names with underscores); flags given on the command
  line win over the file.
* Checkpoints are written to ``tmp-checkpoint-N`` and renamed to ``checkpoint-N`` once complete, so a run killed
  while saving never leaves a half-written ``checkpoint-N`` behind; ``--resume-from-checkpoint auto`` picks the
  last complete one.
* On logging steps, p-MoD routing statistics are logged with the loss (``pmod/...`` keys).

Also runs as ``python -m pmod.train ...`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import DataLoader
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from pmod.config import PModConfig
from pmod.convert import get_pmod_config, is_pmod_model, load, pmod_layers, record_routing

logger = logging.getLogger(__name__)

TMP_PREFIX = "tmp-"
PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"


class TrainError(Exception):
    """A user error in the training setup (``pmod train`` prints it as one line)."""


@dataclass
class ModelArguments:
    """Which model to start from, which stage to run and how to convert it to p-MoD."""

    model: str | None = field(default=None, metadata={"help": "a LLaVA / LLaVA-NeXT (or p-MoD) model folder"})
    llm: str | None = field(default=None, metadata={"help": "assemble: a LlamaForCausalLM folder (with tokenizer)"})
    vision_tower: str | None = field(default=None, metadata={"help": "assemble: a CLIPVisionModel folder"})
    projector: str | None = field(default=None, metadata={"help": "assemble: projector weights (.bin/.safetensors)"})
    stage: str = field(default="finetune", metadata={"help": "pretrain (projector only) or finetune"})
    vision_lr: float | None = field(default=None, metadata={"help": "unfreeze the vision tower with this lr"})
    no_pmod: bool = field(default=False, metadata={"help": "finetune the dense baseline (no p-MoD conversion)"})
    pmod_schedule: str = field(default="prd", metadata={"help": "prd, linear, constant or explicit"})
    pmod_beta: float = 0.5
    pmod_max_ratio: float = 0.85
    pmod_min_ratio: float = 0.15
    pmod_ratio: float = 0.5
    pmod_layers: str | None = field(default=None, metadata={"help": "constant schedule layers, e.g. '1,2,3'"})
    pmod_ratios: str | None = field(default=None, metadata={"help": "explicit ratios, e.g. 'none,0.5,0.5'"})
    pmod_weight_norm: str = "tanh"
    pmod_string: bool = True
    lora_r: int | None = field(default=None, metadata={"help": "train the LLM with LoRA of this rank (needs peft)"})
    lora_alpha: int = 16
    lora_dropout: float = 0.05

    def __post_init__(self) -> None:
        if self.stage not in ("pretrain", "finetune"):
            raise TrainError(f"--stage must be 'pretrain' or 'finetune', got {self.stage!r}")
        if self.model is None and self.llm is None:
            raise TrainError("give --model DIR, or --llm DIR and --vision-tower DIR to assemble a LLaVA model")
        if self.model is not None and (self.llm or self.vision_tower or self.projector):
            raise TrainError("--model excludes --llm / --vision-tower / --projector")
        if self.llm is not None and self.vision_tower is None:
            raise TrainError("--llm needs --vision-tower")

    def pmod_config(self) -> PModConfig:
        """The :class:`PModConfig` of the ``--pmod-*`` flags."""

        def ratio(s: str) -> float | None:
            return None if s.strip().lower() in ("none", "dense", "") else float(s)

        try:
            return PModConfig(
                schedule=self.pmod_schedule,  # type: ignore[arg-type]
                beta=self.pmod_beta,
                max_ratio=self.pmod_max_ratio,
                min_ratio=self.pmod_min_ratio,
                ratio=self.pmod_ratio,
                layers=None if self.pmod_layers is None else [int(x) for x in self.pmod_layers.split(",")],
                ratios=None if self.pmod_ratios is None else [ratio(x) for x in self.pmod_ratios.split(",")],
                weight_norm=self.pmod_weight_norm,  # type: ignore[arg-type]
                string=self.pmod_string,
            )
        except ValueError as err:
            raise TrainError(str(err)) from err


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``pmod train`` flags (ModelArguments, DataArguments, TrainingArguments, ``--config``)."""
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


def assemble_llava(llm: str, vision_tower: str, projector: str | None = None) -> tuple[nn.Module, Any]:
    """A ``LlavaForConditionalGeneration`` from a Llama folder, a CLIP vision folder (features of layer -2, CLS
    dropped) and optionally projector weights (2-layer GELU MLP), with its ``LlavaProcessor``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(llm)
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    lm = LlamaForCausalLM.from_pretrained(llm)
    vision = CLIPVisionModel.from_pretrained(vision_tower)
    vcfg: CLIPVisionConfig = vision.config
    try:
        image_processor = CLIPImageProcessor.from_pretrained(vision_tower)
    except OSError:  # a bare vision folder: square images at the tower's resolution
        size = vcfg.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        text_config=lm.config.to_dict(),
        vision_config=vcfg.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.model.vision_tower.load_state_dict(vision.state_dict())
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer))
    if projector is not None:
        _load_projector(model, projector)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return model, processor


def _load_projector(model: nn.Module, path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Original LLaVA names the MLP mm_projector.{0,2}; HF names it multi_modal_projector.linear_{1,2}.
    renamed = {}
    for key, value in state.items():
        tail = key.split("mm_projector.")[-1].split(f"{PROJECTOR}.")[-1]
        tail = tail.replace("0.", "linear_1.", 1) if tail.startswith("0.") else tail
        tail = tail.replace("2.", "linear_2.", 1) if tail.startswith("2.") else tail
        renamed[tail] = value
    projector = getattr(model.model, PROJECTOR)
    missing, unexpected = projector.load_state_dict(renamed, strict=False)
    if missing or unexpected:
        raise TrainError(f"projector weights {path} do not fit: missing {missing}, unexpected {unexpected}")


def build_model(margs: ModelArguments) -> tuple[nn.Module, Any]:
    """Load or assemble the model and processor, convert it for stage 2 and set what trains."""
    if margs.model is not None:
        if not (Path(margs.model) / "config.json").is_file():
            raise TrainError(f"--model {margs.model} has no config.json")
        cls = _architecture(margs.model)
        config = transformers.AutoConfig.from_pretrained(margs.model)
        model = load(margs.model) if getattr(config, "pmod", None) is not None else cls.from_pretrained(margs.model)
        processor = transformers.AutoProcessor.from_pretrained(margs.model)
    else:
        model, processor = assemble_llava(margs.llm, margs.vision_tower, margs.projector)  # type: ignore[arg-type]

    if margs.stage == "finetune" and not margs.no_pmod:
        if is_pmod_model(model):
            logger.info("model is already p-MoD (%s); keeping its routing", get_pmod_config(model))
        else:
            from pmod.convert import convert

            convert(model, margs.pmod_config())
    set_trainable(model, margs.stage, train_vision=margs.vision_lr is not None)
    model.config.use_cache = False
    return model, processor


def set_trainable(model: nn.Module, stage: str, train_vision: bool = False) -> None:
    """Stage 1: only the projector trains. Stage 2: everything but the vision tower (unless ``train_vision``)."""
    for name, param in model.named_parameters():
        if stage == "pretrain":
            param.requires_grad_(PROJECTOR in name)
        else:
            param.requires_grad_(train_vision or VISION not in name)


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
        modules_to_save=[PROJECTOR, "router"],
    )
    return peft.get_peft_model(model, config)


# -------------------------------------------------------------------------------------------------------- routing
class RoutingStats:
    """Accumulates p-MoD routing statistics over the micro-batches of one logging step."""

    def __init__(self, model: nn.Module) -> None:
        cfg = get_pmod_config(model)
        self.layers = sorted(pmod_layers(model))
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.norm, self.scale, self.bias = (cfg.weight_norm, cfg.scale, cfg.bias) if cfg else ("none", 1.0, 0.0)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, rec: Any, inputs: dict[str, torch.Tensor]) -> None:
        """Add the routing of one forward (``rec`` from :func:`pmod.record_routing`) on ``inputs``."""
        ids = inputs.get("input_ids")
        if ids is None or self.image_token_id is None:
            return
        vision = ids == self.image_token_id
        if "attention_mask" in inputs:
            vision &= inputs["attention_mask"].bool()
        n = int(vision.sum())
        if n == 0:
            return
        for layer in self.layers:
            for processed, weights in zip(rec.processed.get(layer, []), rec.weights.get(layer, [])):
                if processed.shape != vision.shape:
                    continue
                w = weights[vision].double()
                self._acc(f"pmod/processed/L{layer}", float(processed[vision].sum()), n)
                self._acc("pmod/w_mean", float(w.sum()), n)
                self._acc("pmod/w_sq", float((w * w).sum()), n)
                sat = self._saturated(w)
                if sat is not None:
                    self._acc("pmod/w_saturated", float(sat.sum()), n)

    def _saturated(self, w: torch.Tensor) -> torch.Tensor | None:
        # "Within 1% of the bounds": the activation's output is in its outer 1% (|tanh| >= 0.99, sigmoid <= 0.01
        # or >= 0.99); a router stuck there no longer gets useful gradients.
        u = (w - self.bias) / self.scale
        if self.norm == "tanh":
            return u.abs() >= 0.99
        if self.norm == "sigmoid":
            return (u <= 0.01) | (u >= 0.99)
        return None

    def _acc(self, key: str, total: float, n: int) -> None:
        self.sums[key] += total
        self.counts[key] += n

    def summary(self) -> dict[str, float]:
        """Mean statistics since the last :meth:`reset`: processed vision-token fraction per layer, mean/std of
        w~ over vision tokens and the fraction of w~ saturated at the activation's bounds."""
        out = {k: self.sums[k] / self.counts[k] for k in self.sums if k.startswith("pmod/processed")}
        if self.counts.get("pmod/w_mean"):
            mean = self.sums["pmod/w_mean"] / self.counts["pmod/w_mean"]
            sq = self.sums["pmod/w_sq"] / self.counts["pmod/w_sq"]
            out["pmod/w_mean"] = mean
            out["pmod/w_std"] = math.sqrt(max(sq - mean * mean, 0.0))
        if self.counts.get("pmod/w_saturated"):
            out["pmod/w_saturated"] = self.sums["pmod/w_saturated"] / self.counts["pmod/w_saturated"]
        return out


class _EpochDataLoader(DataLoader):
    """A DataLoader over a batch sampler that forwards ``set_epoch`` to it (Trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


# -------------------------------------------------------------------------------------------------------- trainer
class PModTrainer(Trainer):
    """Trainer with modality-grouped batches, a separate vision-tower lr, p-MoD routing logs and atomic
    checkpoints."""

    def __init__(
        self, *args: Any, group_by_modality: bool = False, vision_lr: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.group_by_modality = group_by_modality
        self.vision_lr = vision_lr
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._routing = RoutingStats(base) if is_pmod_model(base) else None
        self._routing_model = base
        self._staging_dir: str | None = None

    # -- data
    def get_train_dataloader(self) -> DataLoader:
        if not self.group_by_modality:
            return super().get_train_dataloader()
        from pmod.data.dataset import ModalityLengthGroupedSampler

        # The sampler is rank-aware and seeded by (seed, epoch), so a resumed run replays the same order; it
        # is not passed through accelerator.prepare, which would shard its batches a second time.
        sampler = ModalityLengthGroupedSampler(
            self.train_dataset.modality_lengths,
            self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            rank=self.args.process_index,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )
        return _EpochDataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )

    # -- optimizer
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.vision_lr is None or self.optimizer is not None:
            return super().create_optimizer(*args, **kwargs)
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups[(VISION in name, name in decay)].append(param)
        cls, kw = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = cls(
            [
                {
                    "params": params,
                    "weight_decay": self.args.weight_decay if is_decay else 0.0,
                    **({"lr": self.vision_lr} if is_vision else {}),
                }
                for (is_vision, is_decay), params in groups.items()
            ],
            **kw,
        )
        return self.optimizer

    # -- routing statistics on logging steps
    def _is_logging_step(self) -> bool:
        args, step = self.args, self.state.global_step + 1  # the step this forward belongs to
        if args.logging_strategy != "steps" or not args.logging_steps:
            return False
        steps = args.logging_steps
        if steps < 1:  # a fraction of max_steps
            steps = max(1, math.ceil(self.state.max_steps * steps))
        return step % int(steps) == 0 or (args.logging_first_step and step == 1)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._routing is None or not model.training or not self._is_logging_step():
            return super().compute_loss(model, inputs, *args, **kwargs)
        with record_routing(self._routing_model) as rec:
            out = super().compute_loss(model, inputs, *args, **kwargs)
        self._routing.add(rec, inputs)
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._routing is not None and "loss" in logs:
            logs = {**logs, **self._routing.summary()}
            self._routing.reset()
        super().log(logs, *args, **kwargs)

    # -- resume
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Trainer loads model.safetensors with a plain load_state_dict, but save_pretrained writes LLaVA weights
        # under their legacy key names, so nothing would match; from_pretrained applies the key mapping.
        target = model if model is not None else self.model
        base = target.get_base_model() if hasattr(target, "get_base_model") else target
        if hasattr(target, "get_base_model") or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = (
            load(resume_from_checkpoint) if is_pmod_model(base) else type(base).from_pretrained(resume_from_checkpoint)
        )
        base.load_state_dict(loaded.state_dict())

    # -- atomic checkpoints
    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        # Trainer writes <run_dir>/checkpoint-N; pointing its run dir at a staging folder makes it write
        # <run_dir>/tmp-checkpoint-N/checkpoint-N, which is renamed into place once every rank is done.
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, TMP_PREFIX + name), os.path.join(run_dir, name)
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.isdir(final):  # re-saving a step (e.g. after resuming): replace the old one
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(staging):
                self.state.best_model_checkpoint = final
            _rotate(self, run_dir)
        self.accelerator.wait_for_everyone()


def _rotate(trainer: Trainer, run_dir: str) -> None:
    try:  # transformers >= 5.x helper
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:
        trainer._rotate_checkpoints(use_mtime=False, output_dir=run_dir)  # type: ignore[attr-defined]
        return
    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=trainer.args.save_total_limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=False,
    )


def _clean_staging(output_dir: str) -> None:
    # Leftovers of a run killed while saving: never complete, never resumed from.
    if os.path.isdir(output_dir):
        for entry in os.listdir(output_dir):
            if entry.startswith(TMP_PREFIX + PREFIX_CHECKPOINT_DIR):
                shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------ run
def train(
    margs: ModelArguments,
    dargs: DataArguments,
    targs: TrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> PModTrainer:
    """Run one training stage and save the final model and processor to ``targs.output_dir``; returns the
    trainer (its ``state.log_history`` holds the logs)."""
    from pmod.data.dataset import LlavaCollator, LlavaDataset

    if dargs.data_path is None:
        raise TrainError("--data-path is required")
    if not Path(dargs.data_path).is_file():
        raise TrainError(f"--data-path {dargs.data_path} not found")
    transformers.set_seed(targs.seed)
    model, processor = build_model(margs)
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
        _clean_staging(targs.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    if margs.lora_r:
        trainer.model = trainer.model.merge_and_unload()  # a plain (p-MoD) model folder for pmod.load / generate
    trainer.model.config.use_cache = True
    trainer.save_model(targs.output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(targs.output_dir)
    trainer.accelerator.wait_for_everyone()
    return trainer


def run(args: argparse.Namespace) -> int:
    """``pmod train``: parse the given flags and ``--config``, then train."""
    from pmod.cli import CLIError

    try:
        margs, dargs, targs = args_from_namespace(args)
        train(margs, dargs, targs)
    except TrainError as err:
        raise CLIError(str(err)) from err
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pmod.train`` (e.g. under torchrun)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        margs, dargs, targs = parse_args(sys.argv[1:] if argv is None else argv)
        train(margs, dargs, targs)
    except TrainError as err:
        print(f"pmod train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "DataArguments",
    "ModelArguments",
    "PModTrainer",
    "RoutingStats",
    "TrainError",
    "add_arguments",
    "assemble_llava",
    "build_model",
    "parse_args",
    "run",
    "set_trainable",
    "train",
]
