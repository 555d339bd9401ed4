"""The run of ``pmod train``: load or assemble the model, convert it with the stage-2 method, freeze what stays
frozen, and train on the Hugging Face Trainer (:mod:`pmod.recipes.trainer`). The flags are read and checked by
:mod:`pmod.recipes.train`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from pmod.core.backbone import backbone_for
from pmod.core.config import MethodConfig, stored_method_config
from pmod.core.convert import convert, get_method_config, load
from pmod.io.importers.llava_parts import assemble_llava
from pmod.io.model_folder import check_model_folder
from pmod.recipes.train import TrainConfig, TrainError
from pmod.recipes.train_output import output_lock, resume_point, save_final
from pmod.recipes.trainer import RoutedTrainer, clean_staging
from pmod.recipes.trainer_fields import installed_name

logger = logging.getLogger(__name__)

#: Records tried before training to catch a wrong --image-folder (every one unusable) at once.
PRECHECK_RECORDS = 8


def build_model(
    cfg: TrainConfig, method_config: MethodConfig | None = None, folder_config: dict[str, Any] | None = None
) -> tuple[nn.Module, Any]:
    """Load or assemble the model and processor of ``cfg``, convert it for stage 2 (with ``method_config``, or the
    one of ``--method``) and set what trains. ``folder_config``: ``--model``'s config.json, when the caller checked
    it already."""
    wanted = None
    if cfg.stage == "finetune":
        wanted = method_config if method_config is not None else cfg.method_config()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars would interleave with the run's logs
    try:
        if cfg.model is not None:
            if folder_config is None:
                check_model_folder(cfg.model, "pmod train")
            model = load(cfg.model)  # routed or dense
            processor = transformers.AutoProcessor.from_pretrained(cfg.model)
        else:
            model, processor = assemble_llava(cfg.llm, cfg.vision_tower, cfg.projector)  # type: ignore[arg-type]
    finally:
        transformers.utils.logging.enable_progress_bar()
    if cfg.stage == "finetune":
        current = get_method_config(model)
        if current is None and wanted is not None:
            convert(model, wanted)
        elif current is not None:  # routed, or settings that route no layer (it trains dense)
            asked = method_config is not None or cfg.routing_requested
            if asked and wanted != current:  # a routed model cannot be converted again: never train other routing
                raise TrainError(
                    f"{cfg.model} is already a {current.method} model, but this run asks for "
                    f"{'a dense model' if wanted is None else f'{wanted!r}'}; start from the dense folder, or drop "
                    f"--method and the method flags to go on training its own routing."
                )
            logger.info("model is already routed (%s); keeping its routing", current)
    set_trainable(model, cfg.stage, train_vision=cfg.vision_lr is not None)
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


def apply_lora(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """LoRA adapters on the language model's projections; routers and projector train fully."""
    try:
        import peft
    except ImportError as err:
        raise TrainError("--lora-r needs peft: pip install peft") from err
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=["multi_modal_projector", "router", "gamma_mod_router"],
    )
    return peft.get_peft_model(model, config)


def precheck(dataset: Any, image_folder: str | None) -> None:
    """Encode the first records once, before the Trainer writes anything: with ``--on-bad-sample error`` a bad one
    stops the run here; otherwise, if every one is unusable (a wrong --image-folder, say), stop with the reason of
    the first."""
    first = range(min(PRECHECK_RECORDS, len(dataset)))
    if dataset.on_bad_sample == "error":
        for i in first:
            dataset[i]  # raises BadSampleError (a one-line UserError) for a bad record
        return
    problems = []
    for i in first:
        try:
            dataset.encode(i)
            return
        except Exception as err:  # noqa: BLE001 - the dataset's own "unusable" error, whatever its reason
            problems.append(str(err))
    if problems:
        where = f"--image-folder {image_folder}" if image_folder else "the data file's folder (no --image-folder)"
        raise TrainError(
            f"none of the first {len(problems)} records can be used (first: {problems[0]}); check the images' "
            f"root, now {where}, and `pmod data check` the file"
        )


def check_resume_matches(checkpoint: str | None, model: nn.Module) -> None:
    """Refuse a checkpoint whose routing differs from the model this run built, naming both."""
    if checkpoint is None or not (Path(checkpoint) / "config.json").is_file():
        return
    import json

    stored = stored_method_config(json.loads((Path(checkpoint) / "config.json").read_text()))
    current = get_method_config(model)
    if stored == current:
        return
    if stored is not None and current is not None and stored.method == current.method:
        theirs, ours = stored.to_dict(), current.to_dict()
        differ = ", ".join(f"{k}={theirs[k]!r} (this run: {ours[k]!r})" for k in theirs if theirs[k] != ours[k])
        held = f"a {stored.method} model with {differ}"
    else:
        held = "a dense model" if stored is None else f"a {stored.method} model"
        held += f", but this run builds {'a dense model' if current is None else 'a ' + current.method + ' model'}"
    raise TrainError(
        f"{checkpoint} holds {held}; resume with the same --method and --<method>-* flags, or start a new "
        f"--output-dir"
    )


def train(
    config: TrainConfig,
    callbacks: list[TrainerCallback] | None = None,
    method_config: MethodConfig | None = None,
) -> RoutedTrainer:
    """Run the stage of ``config`` and save the final model and processor to its ``trainer.output_dir``; returns
    the trainer (its ``state.log_history`` holds the logs). ``method_config`` overrides ``--method`` for stage 2.

    The output folder is locked for the run and checked before the model loads; a checkpoint is checked before it
    is resumed; unusable (non-finite or overflowing) weights are never saved; the final save is atomic or marked
    as incomplete (:mod:`pmod.recipes.train_output`)."""
    targs = config.trainer
    if targs is None:
        raise TrainError("the TrainConfig has no trainer arguments: pass trainer=TrainingArguments(output_dir=...)")
    if config.data_path is None:
        raise TrainError("--data-path is required: a LLaVA-format JSON or JSONL file")
    if not Path(config.data_path).is_file():
        raise TrainError(f"--data-path {config.data_path} not found; pass a LLaVA-format JSON or JSONL file")
    if method_config is not None and not method_config.trainable:
        raise TrainError(f"{method_config.method} is training-free: it has nothing to train.")
    # Mistakes in the inputs answer before the output folder is created or locked.
    folder = check_model_folder(config.model, "pmod train") if config.model is not None else None
    with output_lock(targs):
        return _train_locked(config, targs, callbacks, method_config, folder)


def _train_locked(
    cfg: TrainConfig,
    targs: TrainingArguments,
    callbacks: list[TrainerCallback] | None,
    method_config: MethodConfig | None,
    folder_config: dict[str, Any] | None,
) -> RoutedTrainer:
    from pmod.data.batching import LlavaCollator
    from pmod.data.dataset import LlavaDataset

    transformers.set_seed(targs.seed)
    model, processor = build_model(cfg, method_config, folder_config)
    if cfg.budget_range is not None:  # each step at a drawn budget; the trained ratios restored before saves
        from pmod.recipes.budget_range import BudgetRange

        callbacks = [*(callbacks or []), BudgetRange(model, *cfg.check_budget_range(), seed=targs.seed)]
    if cfg.lora_r:
        model = apply_lora(model, cfg)
    set_trainer_options(targs, model)
    dataset = LlavaDataset(
        cfg.data_path,
        processor,
        image_folder=cfg.image_folder,
        max_length=cfg.max_length,
        conv_template=cfg.conv_template,  # type: ignore[arg-type]
        on_bad_sample=cfg.on_bad_sample,  # type: ignore[arg-type]
    )
    precheck(dataset, cfg.image_folder)
    resume = resume_point(targs)
    check_resume_matches(resume, model)
    if targs.resume_from_checkpoint is not None:
        said = f"resuming from {resume}" if resume else f"no checkpoint in {targs.output_dir}: starting from scratch"
        print(f"pmod train: {said}", file=sys.stderr)
    trainer = RoutedTrainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=LlavaCollator.from_tokenizer(processor.tokenizer),
        processing_class=processor,
        callbacks=callbacks,
        group_by_modality=cfg.group_by_modality_length,
        vision_lr=cfg.vision_lr,
    )
    if trainer.args.should_save:
        clean_staging(targs.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    finish_training(trainer, processor, dataset, cfg, targs)
    return trainer


def set_trainer_options(targs: TrainingArguments, model: nn.Module) -> None:
    """The Trainer options this model and machine need: activation checkpointing without reentrancy (and with
    gradients into the inputs), the collator's every key kept, and no memory pinning without an accelerator."""
    checkpointing = installed_name("activation_checkpointing")  # gradient_checkpointing before transformers 5.24
    if getattr(targs, checkpointing):
        options = f"{checkpointing}_kwargs"
        setattr(targs, options, getattr(targs, options) or {"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    targs.remove_unused_columns = False  # the collator's keys are the model's inputs; keep image_sizes etc.
    if not torch.cuda.is_available():
        targs.dataloader_pin_memory = False  # pinning needs an accelerator; on a CPU it only warns


def finish_training(
    trainer: RoutedTrainer, processor: Any, dataset: Any, cfg: TrainConfig, targs: TrainingArguments
) -> None:
    """After training: the skipped steps reported, LoRA merged into the weights, the final model and processor
    saved (:func:`pmod.recipes.train_output.save_final`), and the data used named."""
    skipped = trainer.skipped_report()
    if skipped and trainer.args.should_save:
        logger.warning(skipped)
        print(f"pmod train: {skipped}", file=sys.stderr)
    if cfg.lora_r:
        trainer.model = trainer.model.merge_and_unload()  # a plain (routed) model folder for pmod.load / generate
    trainer.model.config.use_cache = True
    save_final(trainer, processor, targs.output_dir)
    if trainer.args.should_save:
        print(f"pmod train: data: {dataset.summary().splitlines()[0]}", file=sys.stderr)
