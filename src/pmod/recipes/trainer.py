"""The Trainer of ``pmod train``: modality-grouped batches, a separate vision-tower learning rate, routing logs,
non-finite losses counted and skipped instead of crashing a run (and logged as they were), atomic checkpoints, and
no checkpoint of unusable (non-finite or overflowing) weights."""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, get_last_checkpoint

from pmod.analysis.stats import RoutingStats
from pmod.core.backbone import find_backbone
from pmod.core.convert import is_routed_model, load, record_routing, routing_loss
from pmod.core.weight_files import MAX_WEIGHT, unusable_weights
from pmod.recipes.train import TrainError

TMP_PREFIX = "tmp-"
#: The staging folder of the final model inside the output folder (see :mod:`pmod.recipes.train_output`).
FINAL_STAGING = TMP_PREFIX + "final"


class StepLogs(TrainerCallback):
    """Knows, as an optimizer step begins, whether the Trainer will log it (``DefaultFlowCallback``'s rule, applied
    one step early), so that routing is recorded only in the forwards of the steps that report it."""

    def __init__(self) -> None:
        self.now = False

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        step, every = state.global_step + 1, state.logging_steps  # every: --logging-steps, a fraction made a count
        by_steps = args.logging_strategy == IntervalStrategy.STEPS and bool(every) and step % every == 0
        self.now = by_steps or (args.logging_first_step and step == 1)


class EpochDataLoader(DataLoader):
    """A DataLoader over a batch sampler that forwards ``set_epoch`` to it (Trainer calls it each epoch)."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)


def base_model(model: nn.Module) -> nn.Module:
    """The model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class RoutedTrainer(Trainer):
    """Trainer with modality-grouped batches, a separate vision-tower lr, routing logs (``pmod/...`` keys),
    non-finite losses skipped and counted (``pmod/nonfinite_loss_steps``), and atomic checkpoints."""

    def __init__(
        self, *args: Any, group_by_modality: bool = False, vision_lr: float | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.group_by_modality = group_by_modality
        self.vision_lr = vision_lr
        base = base_model(self.model)
        self._routing = RoutingStats(base) if is_routed_model(base) else None
        self._routing_model = base
        self._staging_dir: str | None = None
        self.nonfinite_loss_steps = 0  # micro-batches skipped for a non-finite loss, this process
        self.train_batches = 0  # micro-batches trained on, this process
        self._skipped_loss: float | None = None  # the non-finite loss of the micro-batch in training_step, if any
        # This logging window's micro-batch losses as training_step returned them: sum and count of the finite
        # ones, count of the skipped ones, and the last skipped one's value.
        self._window: dict[str, Any] = {"sum": 0.0, "finite": 0, "skipped": 0, "last": math.nan}
        self._routing_losses: list[torch.Tensor] = []
        self._step_logs = StepLogs()
        self.add_callback(self._step_logs)

    # -- data
    def get_train_dataloader(self) -> DataLoader:
        if not self.group_by_modality:
            return super().get_train_dataloader()
        from pmod.data.batching import ModalityLengthGroupedSampler

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
        return EpochDataLoader(
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
        adapter = find_backbone(base_model(self.model))
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = defaultdict(list)
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups[(adapter is not None and adapter.is_vision_parameter(name), name in decay)].append(param)
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

    # -- routing statistics on logging steps; non-finite losses
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if self._routing is None or not model.training or not self._step_logs.now:
            out = super().compute_loss(model, inputs, *args, **kwargs)
        else:
            with record_routing(self._routing_model) as rec:
                out = super().compute_loss(model, inputs, *args, **kwargs)
            self._routing.add(rec, inputs)
        if not model.training:
            return out
        extra = routing_loss(self._routing_model)
        if extra is not None:
            self._routing_losses.append(extra)
        return self._finite_or_skipped(model, out)

    def _finite_or_skipped(self, model: nn.Module, out: Any) -> Any:
        # A non-finite loss (e.g. vanilla MoD's unbounded router weights overflowing) would turn every weight into
        # NaN at the next optimizer step. Count it and give this micro-batch an exact zero loss instead, built from
        # the parameters only, so backward does not touch the broken graph and every gradient is 0.
        loss = out[0] if isinstance(out, tuple) else out
        self.train_batches += 1
        if bool(torch.isfinite(loss.detach()).all()):
            return out
        self.nonfinite_loss_steps += 1
        self._skipped_loss = float(loss.detach().float().sum())  # NaN or +-inf, logged as it was
        zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        return (zero, *out[1:]) if isinstance(out, tuple) else zero

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        self._skipped_loss = None
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._skipped_loss is None:
            self._window["sum"] = self._window["sum"] + loss.detach()  # on the device: no sync per step
            self._window["finite"] += 1
        else:
            loss = torch.full_like(loss, self._skipped_loss)  # the zero that was trained on is not this batch's loss
            self._window["skipped"] += 1
            self._window["last"] = self._skipped_loss
        return loss

    def _window_loss(self) -> float | None:
        # The Trainer's own nan/inf filter stands in the window's running mean, which is 0 at a window's start, so a
        # window with skipped batches would log a loss of 0. Log the mean of its finite batches instead (this
        # process's; scaled back from the gradient-accumulation share), or the non-finite value itself when every
        # batch was skipped.
        window = self._window
        if not window["skipped"]:
            return None
        if not window["finite"]:
            return window["last"]
        return float(window["sum"]) / window["finite"] * self.args.gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs = dict(logs)
            honest = self._window_loss()
            if honest is not None:
                logs["loss"] = honest
            self._window = {"sum": 0.0, "finite": 0, "skipped": 0, "last": math.nan}
            if self._routing is not None:
                logs.update(self._routing.summary())
                self._routing.reset()
            if self._routing_losses:
                logs["pmod/routing_loss"] = float(torch.stack(self._routing_losses).mean())
                self._routing_losses.clear()
            logs["pmod/nonfinite_loss_steps"] = self.nonfinite_loss_steps
        if "train_runtime" in logs:  # the run's closing entry
            logs = {**logs, "pmod/nonfinite_loss_steps": self.nonfinite_loss_steps, "pmod/batches": self.train_batches}
        super().log(logs, *args, **kwargs)

    def skipped_report(self) -> str | None:
        """One line on the batches skipped for a non-finite loss (None when there were none); it warns when they
        were most of the run's."""
        if not self.nonfinite_loss_steps:
            return None
        said = f"{self.nonfinite_loss_steps} of {self.train_batches} batches had a non-finite loss and were skipped"
        if 2 * self.nonfinite_loss_steps <= self.train_batches:
            return f"{said} (no update from them)"
        return (
            f"warning: {said}: most of this run's updates were skipped, so the model barely trained; lower "
            f"--learning-rate (now {self.args.learning_rate:g}) or set --max-grad-norm"
        )

    def check_weights(self, what: str) -> None:
        """Refuse (a one-line :class:`TrainError`) to save ``what`` when any process holds a non-finite weight or one
        beyond :data:`MAX_WEIGHT`; every process calls it, and every one raises."""
        found = next(iter(unusable_weights(self.model)), None)
        flag = torch.tensor([float(found is not None)], device=self.args.device)
        if self.args.world_size > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if not float(flag.sum()):
            return
        name, peak = found if found is not None else ("a weight held by another process", math.nan)
        size = "non-finite" if not math.isfinite(peak) else f"{peak:.3g} in magnitude (beyond {MAX_WEIGHT:.2g})"
        run_dir = super()._get_output_dir(None)
        last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        kept = f"the last saved checkpoint, {last}, is intact" if last else "no checkpoint was saved before"
        raise TrainError(
            f"not saving {what} at step {self.state.global_step}: its weights are unusable ({name} is {size}); "
            f"{self.nonfinite_loss_steps} of {self.train_batches} batches had a non-finite loss and were skipped. "
            f"The training diverged: {kept}; lower --learning-rate (now {self.args.learning_rate:g}) or set "
            f"--max-grad-norm and train again"
        )

    # -- resuming a finished run
    # Kept private: it needs a hook before an epoch's first step that can skip it (on_epoch_begin, if _run_epoch
    # read control.should_training_stop before its first step); transformers has none.
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # Resumed from the run's last step, the Trainer would still train one step (and save checkpoint-<max+1>)
        # before it checks for the end; a finished run has nothing left to train, only its final save.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)  # type: ignore[misc]

    # -- resume
    # Kept private: it needs a hook that replaces the Trainer's weight loading (a callback's on_train_begin could
    # only load them again after a plain load_state_dict that matches no key); transformers has none.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # Trainer loads model.safetensors with a plain load_state_dict, but save_pretrained writes LLaVA weights
        # under their legacy key names, so nothing would match; from_pretrained applies the key mapping.
        target = model if model is not None else self.model
        base = base_model(target)
        if hasattr(target, "get_base_model") or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = (
            load(resume_from_checkpoint)
            if is_routed_model(base)
            else type(base).from_pretrained(resume_from_checkpoint)
        )
        base.load_state_dict(loaded.state_dict())

    # -- atomic checkpoints
    # Kept private: staging needs a hook around the save itself (on_save runs after the files are written, in place);
    # transformers has none. _get_output_dir is where _save_checkpoint reads its folder from.
    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self.check_weights(f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
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
            rotate(self, run_dir)
        self.accelerator.wait_for_everyone()


def rotate(trainer: Trainer, run_dir: str) -> None:
    """Delete checkpoints beyond ``save_total_limit`` (oldest first, the best one kept)."""
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


def clean_staging(output_dir: str) -> None:
    """Remove leftovers of a run killed while saving (a checkpoint's or the final model's staging folder): never
    complete, never resumed from."""
    if os.path.isdir(output_dir):
        for entry in os.listdir(output_dir):
            if entry.startswith(TMP_PREFIX + PREFIX_CHECKPOINT_DIR) or entry == FINAL_STAGING:
                shutil.rmtree(os.path.join(output_dir, entry), ignore_errors=True)
