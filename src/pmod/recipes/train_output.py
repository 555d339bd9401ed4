"""What ``pmod train`` writes, and what it resumes from: one writer per output folder (also under torchrun), the
folder checked before the first step, a checkpoint checked before it is resumed (a broken last one falls back to the
one before), and a final model that is complete or marked as incomplete, never half-written without a word."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.errors import UserError
from pmod.core.files import INCOMPLETE_NAME, OutputLock, atomic_write_text, check_output_folder
from pmod.core.weight_files import CorruptWeightFile, check_weight_file
from pmod.recipes.train import TrainError
from pmod.recipes.trainer import FINAL_STAGING

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from pmod.recipes.trainer import RoutedTrainer

#: What the marker of an interrupted final save tells a reader to do.
INCOMPLETE_ADVICE = (
    "pmod train was stopped while saving its final model here; run the same pmod train command with "
    "--resume-from-checkpoint auto to save it again (no training is repeated), or load one of its checkpoint-N folders."
)
_WEIGHTS = re.compile(r"^(model|pytorch_model|adapter_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


# ------------------------------------------------------------------------------------------------------- the lock
def _agree(problem: str | None) -> str | None:
    """The first problem any process found (every process gets the same answer), so that under torchrun all ranks
    stop together with the same line instead of the others waiting forever in their first collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return problem
    found: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, problem)
    return next((p for p in found if p), None)


@contextlib.contextmanager
def output_lock(targs: TrainingArguments) -> Iterator[None]:
    """Hold ``--output-dir`` for the run: the global main process takes its :class:`OutputLock` (which checks it can
    be written), other saving processes (``--save-on-each-node``) check it can be written. A problem anywhere is a
    one-line :class:`TrainError` on every process, before the model is even loaded."""
    lock, problem = None, None
    try:
        if targs.process_index == 0:
            lock = OutputLock(targs.output_dir, "pmod train", "--output-dir").__enter__()
        elif targs.should_save:
            check_output_folder(targs.output_dir, "--output-dir")
    except UserError as err:
        problem = str(err)
    problem = _agree(problem)
    if problem:
        if lock is not None:
            lock.__exit__(None, None, None)
        raise TrainError(problem)
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------------------- resuming
def checkpoint_problem(folder: Path, targs: TrainingArguments) -> str | None:
    """Why ``folder`` cannot be resumed exactly (None when it can): trainer state unreadable, weights missing or
    corrupt (a safetensors file whose header does not cover the file), optimizer or scheduler state missing or
    corrupt (resuming without it would silently restart the optimizer)."""
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json cannot be read ({type(err).__name__})"
    weights = sorted(p for p in folder.iterdir() if _WEIGHTS.match(p.name) and not p.name.endswith(".json"))
    sharded = targs.deepspeed or getattr(targs, "fsdp", None)  # their weights and states live in their own layout
    if not weights and not sharded:
        return "it has no model weights"
    for path in weights:
        try:
            check_weight_file(path)
        except CorruptWeightFile as err:
            return f"{path.name} is corrupt ({err.detail})"
    if sharded or targs.save_only_model:
        return None
    for name in ("optimizer.pt", "scheduler.pt"):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing, so resuming would silently restart the optimizer"
        if not zipfile.is_zipfile(path):
            return f"{name} is corrupt (truncated?)"
    return None


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: -int(p.name.split("-")[1]))


def resume_point(targs: TrainingArguments) -> str | None:
    """The checkpoint ``--resume-from-checkpoint`` names, checked (:func:`checkpoint_problem`). ``auto``: the newest
    one that can be resumed, saying so in one line when a newer one is broken, or None when there is none; a named
    checkpoint that cannot be resumed, or ``auto`` with only broken ones, is a one-line :class:`TrainError`."""
    resume = targs.resume_from_checkpoint
    if resume is None:
        return None
    if resume != "auto":
        if not os.path.isdir(resume):
            raise TrainError(f"--resume-from-checkpoint {resume} is not a folder; pass a checkpoint-N folder or auto")
        problem = checkpoint_problem(Path(resume), targs)
        if problem:
            raise TrainError(f"--resume-from-checkpoint {resume} cannot be resumed: {problem}; pass an earlier "
                             f"checkpoint-N or auto (the newest complete one)")  # fmt: skip
        return resume
    out = Path(targs.output_dir)
    found = _checkpoints(out) if out.is_dir() else []
    broken = []
    for folder in found:
        problem = checkpoint_problem(folder, targs)
        if problem is None:
            if broken:
                print(f"pmod train: {broken[0][0]} cannot be resumed ({broken[0][1]}); resuming from {folder.name}, "
                      f"the newest complete checkpoint, instead", file=sys.stderr)  # fmt: skip
            return str(folder)
        broken.append((folder.name, problem))
    if broken:
        raise TrainError(f"no checkpoint in {out} can be resumed ({'; '.join(f'{n}: {p}' for n, p in broken)}); "
                         f"remove the broken checkpoint-N folders to start from scratch")  # fmt: skip
    return None


# ----------------------------------------------------------------------------------------------- the final model
def save_final(trainer: RoutedTrainer, processor: Any, output_dir: str) -> None:
    """Save the final model and processor at the top of ``output_dir`` so that a kill leaves the old files, or a
    marker (:data:`pmod.core.files.INCOMPLETE_NAME`) that loaders refuse with what to do: refused if the weights are
    unusable, written to a staging folder, the marker set, the files renamed into place, stale weight shards of an
    earlier save removed, and the marker removed last. Every process calls it (DeepSpeed / FSDP gather here)."""
    trainer.check_weights("the final model")
    out, staging = Path(output_dir), Path(output_dir) / FINAL_STAGING
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()  # DeepSpeed may write its files from every process
    if trainer.args.should_save:
        processor.save_pretrained(str(staging))
        atomic_write_text(out / INCOMPLETE_NAME, INCOMPLETE_ADVICE + "\n")
        new = {p.name for p in staging.iterdir()}
        for old in out.iterdir():  # weights of an earlier save the new one does not overwrite (other sharding)
            if old.is_file() and _WEIGHTS.match(old.name) and old.name not in new:
                old.unlink()
        for path in sorted(staging.iterdir()):
            target = out / path.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
        shutil.rmtree(staging, ignore_errors=True)
        (out / INCOMPLETE_NAME).unlink()
    trainer.accelerator.wait_for_everyone()
