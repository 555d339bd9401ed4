"""The steps of ``pmod demo`` that run models: the tower pre-training, the variants' training (side by side on a
CPU), evaluation and the prefill timing. ``pmod.experiments.demo`` holds the settings and the orchestration."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from pmod.core.config import MethodConfig
from pmod.core.convert import get_method_config, layer_ratios
from pmod.experiments.demo import DemoSettings


def pretrain_vision(base: Path, data: Path, settings: DemoSettings) -> dict[str, Any]:
    """Pre-train the base model's vision tower on per-patch labels and save it back (the stand-in for CLIP)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from pmod.experiments.vision_pretrain import pretrain_vision_tower

    model = LlavaForConditionalGeneration.from_pretrained(base)
    processor = AutoProcessor.from_pretrained(base)
    records = [r for r in json.loads((data / "train.json").read_text()) if r.get("image")]
    held_out = [r for r in json.loads((data / "test.json").read_text()) if r.get("image")]
    result = pretrain_vision_tower(
        model, processor, records, data, steps=settings.vision_pretrain_steps, seed=settings.seed,
        eval_records=held_out, patch_local=settings.patch_local,
    )  # fmt: skip
    model.save_pretrained(base)
    return result


#: Beside the data set in its folder: the settings it was made with, so that a run with other settings makes it again.
DATA_SETTINGS = "pmod-data-settings.json"


def make_data(data: Path, settings: DemoSettings) -> None:
    """The synthetic set of ``settings`` (its task) in ``data``; kept when it was made with the same settings (a set
    is swapped in whole, so one cut short by a kill is made again, and its settings are recorded after it)."""
    from pmod.core.files import atomic_write_json
    from pmod.data import synth

    kinds = list(settings.kinds)
    made_with = {"task": settings.task, "samples": settings.samples, "seed": settings.seed,
                 "image_size": settings.image_size, "turns": settings.turns, "max_shapes": settings.max_shapes,
                 "question_kinds": kinds}  # fmt: skip
    record = data / DATA_SETTINGS
    if (data / "train.json").is_file() and record.is_file() and json.loads(record.read_text()) == made_with:
        return
    record.unlink(missing_ok=True)  # a set made next but cut short must not pass for the one recorded
    synth.generate(
        data,
        settings.samples,
        seed=settings.seed,
        image_size=settings.image_size,
        turns=settings.turns,
        max_shapes=settings.max_shapes,
        question_kinds=kinds,
        task=settings.task,
        overwrite=True,
    )
    atomic_write_json(record, made_with)


def make_blank_data(data: Path, blank: Path) -> None:
    """``data`` with every image replaced by a blank one of its background (:func:`record_image`), in ``blank``:
    the training set of a model that never sees a shape. Kept while ``data`` is the set it was made from (its
    :data:`DATA_SETTINGS` record is copied along); written whole or not at all."""
    import shutil

    from pmod.core.files import atomic_folder

    made_with = (data / DATA_SETTINGS).read_text()
    if (blank / DATA_SETTINGS).is_file() and (blank / DATA_SETTINGS).read_text() == made_with:
        return
    with atomic_folder(blank, replace=True) as staging:
        (staging / "images").mkdir()
        for name in ("train.json", "test.json"):
            for record in json.loads((data / name).read_text()):
                if record.get("image"):
                    record_image(data, record, blank=True).save(staging / record["image"])
            shutil.copyfile(data / name, staging / name)
        (staging / DATA_SETTINGS).write_text(made_with)


def build_base_model(settings: DemoSettings, seed: int) -> tuple[torch.nn.Module, Any]:
    """The demo's small LLaVA model, randomly initialised with ``seed``, and its processor."""
    from pmod.data.tokenizer import SHORT_CHAT_TEMPLATE
    from pmod.experiments.small_llava import build_small_llava

    return build_small_llava(
        num_layers=settings.layers,
        image_size=settings.image_size,
        patch_size=settings.patch_size,
        seed=seed,
        hidden=settings.hidden,
        vision_hidden=settings.vision_hidden,
        vision_layers=settings.vision_layers,
        vision_feature_layer=settings.vision_feature_layer,
        chat_template=SHORT_CHAT_TEMPLATE,  # no system prompt: most of each sequence is vision tokens
        task=settings.task,
        patch_local=settings.patch_local,
    )


def seed_base_model(tower_base: Path, folder: Path, settings: DemoSettings, seed: int) -> Path:
    """The starting point of another seed in ``folder``: projector and decoder initialised with ``seed``, the
    pre-trained tower of ``tower_base`` (frozen in training, so every seed sees the same image features). For the
    seed ``tower_base`` was built with, the result equals ``tower_base``. Kept if already there; written to a
    staging folder first, so a killed run leaves no half-written model."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import LlavaForConditionalGeneration

    from pmod.core.backbone import backbone_for
    from pmod.core.files import atomic_folder

    model, processor = build_base_model(settings, seed)
    tower = LlavaForConditionalGeneration.from_pretrained(tower_base).state_dict()
    adapter = backbone_for(model)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if adapter.is_vision_parameter(name):
                tensor.copy_(tower[name])
    with atomic_folder(folder, replace=True) as staging:  # replace: a folder without config.json is unfinished
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return folder


def parallel_workers(settings: DemoSettings) -> int:
    """How many variants train at once: one per CPU core on a CPU-only machine (each single-threaded, since a
    second thread per process was measured slower on 2 vCPUs), else one at a time."""
    if torch.cuda.is_available():
        return 1
    return max(1, min(len(settings.variants), os.cpu_count() or 1))


def threads_per_worker(workers: int) -> int:
    """torch threads each of ``workers`` side-by-side training processes uses: the cores shared out evenly."""
    return max(1, (os.cpu_count() or 1) // workers)


def train_variants(base: Path, data: Path, out: Path, settings: DemoSettings) -> dict[str, dict[str, Any]]:
    """Train every variant of ``settings.variants`` from ``base``; side by side in worker processes when
    :func:`parallel_workers` allows, which changes nothing but the wall time (each run is seeded on its own)."""
    workers = parallel_workers(settings)
    if workers == 1:
        return {name: train_variant(name, base, data, out / name, settings) for name in settings.variants}
    from pmod.recipes.workers import worker_pool

    threads = threads_per_worker(workers)
    with worker_pool(workers) as pool:  # the workers end with this process, even when it is killed
        futures = {
            name: pool.submit(train_in_worker, name, base, data, out / name, settings, position, threads)
            for position, name in enumerate(settings.variants)
        }
        return {name: future.result() for name, future in futures.items()}


def train_in_worker(
    name: str, base: Path, data: Path, folder: Path, settings: DemoSettings, position: int, threads: int
) -> dict[str, Any]:
    """One variant in a worker process: its own progress bar line; the Trainer's log lines go to train.log."""
    import contextlib

    torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.log", "w") as log, contextlib.redirect_stdout(log):
        return train_variant(name, base, data, folder, settings, progress_position=position)


def train_more_seeds(
    out: Path, settings: DemoSettings, test: list[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``pmod demo --seeds N``: every variant trained and evaluated again with seeds ``settings.seed + 1`` on, from
    base models that share the first seed's pre-trained tower (``pmod.experiments.ablate_runs``: side by side, each
    unit written as it ends). Returns the results and the failures by unit key (``"pmod/seed1"``)."""
    import shutil

    from pmod.experiments.ablate_runs import Layout, Unit, run_units, unit_workers

    layout = Layout(out)
    seeds = range(settings.seed + 1, settings.seed + settings.seeds)
    for seed in seeds:  # made again: the demo pre-trains its tower afresh on every run
        shutil.rmtree(layout.base(seed), ignore_errors=True)
        seed_base_model(layout.tower, layout.base(seed), settings, seed)
    units = [Unit(name, seed, settings.variant_config(name)) for seed in seeds for name in settings.variants]
    workers = unit_workers(len(units))
    return run_units(units, layout, settings, test, threads_per_worker(workers), workers)


class _ProgressBar(TrainerCallback):
    """A progress bar pinned to one terminal line, so that variants trained side by side do not draw over each
    other."""

    def __init__(self, name: str, position: int) -> None:
        self.name, self.position, self.bar = name, position, None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc=f"train {self.name}", position=self.position, leave=True)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.bar.close()


def train_variant(
    name: str, base: Path, data: Path, folder: Path, settings: DemoSettings, progress_position: int | None = None
) -> dict[str, Any]:
    """Train one variant with the library's stage-2 recipe: projector, LLM (and routers) train, the tower is frozen.

    ``progress_position``: draw the progress bar on that terminal line (for runs side by side) instead of the
    Trainer's own bar.
    """
    callbacks = None if progress_position is None else [_ProgressBar(name, progress_position)]
    return train_config(settings.variant_config(name), base, data, folder, settings, callbacks=callbacks)


def train_config(
    config: MethodConfig | None,
    base: Path,
    data: Path,
    folder: Path,
    settings: DemoSettings,
    seed: int | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> dict[str, Any]:
    """Train ``base`` converted with ``config`` (None: dense) into ``folder`` with the demo's budget and ``seed``
    (default: ``settings.seed``), which sets the data order and the routers' initialisation; a trained routed
    ``config`` follows ``settings.budget_range``. ``callbacks`` replace the Trainer's progress bar. Returns the
    folder, the wall and CPU time, the loss curve and the count of skipped non-finite losses."""
    from transformers import TrainingArguments

    from pmod.recipes.train import TrainConfig
    from pmod.recipes.training import train

    seed = settings.seed if seed is None else seed
    targs = TrainingArguments(
        output_dir=str(folder),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.steps // 20),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, settings.steps // 30),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=callbacks is not None,
    )
    run = TrainConfig(
        model=str(base),
        method=config.method if config else "dense",
        data_path=str(data / "train.json"),
        # an image's tokens and room for the questions and answers: 256 for the default 64 px at 8 px patches
        max_length=(settings.image_size // settings.patch_size) ** 2 + 192,
        trainer=targs,
        budget_range=settings.budget_range if config is not None and config.trainable else None,
    )
    started, cpu = time.time(), time.process_time()
    trainer = train(run, callbacks=callbacks, method_config=config)
    seconds, cpu = time.time() - started, time.process_time() - cpu
    history = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return {
        "folder": folder,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),  # this process's CPU time: wall time without other jobs' share
        "loss": history,
        "nonfinite_loss_steps": trainer.nonfinite_loss_steps,
    }


def load_variant(folder: Path) -> tuple[torch.nn.Module, Any]:
    """A trained variant and its processor."""
    from pmod.io.model_folder import load_model

    return load_model(folder, "auto")


def question_and_answer(record: dict[str, Any]) -> tuple[str, str]:
    """The first question of a synthetic record (without its image token) and its answer."""
    human, gpt = record["conversations"][0]["value"], record["conversations"][1]["value"]
    return human.replace("<image>", "").strip(), gpt.strip()


def record_image(data: Path, record: dict[str, Any], blank: bool = False):
    """The image of a synthetic record; ``blank``: an image of the same size in its background colour alone (what
    a model that sees no shape is asked about)."""
    from PIL import Image

    from pmod.data.images import open_image

    image = open_image(data / record["image"])
    return Image.new("RGB", image.size, tuple(record["meta"]["background"])) if blank else image


def evaluate(folder: Path, data: Path, test: list[dict[str, Any]], batch_size: int = 32) -> dict[str, Any]:
    """Exact-match accuracy of the first answer word on the held-out image questions, and analytic cost, of the
    model in ``folder``."""
    model, processor = load_variant(folder)
    return evaluate_model(model, processor, data, test, batch_size)


def evaluate_model(
    model: torch.nn.Module,
    processor: Any,
    data: Path,
    test: list[dict[str, Any]],
    batch_size: int = 32,
    blank_images: bool = False,
) -> dict[str, Any]:
    """:func:`evaluate` of a loaded model (e.g. one converted with a training-free method); ``blank_images`` asks
    every question about a blank image instead (:func:`record_image`)."""
    from pmod.analysis.analytic_flops import estimate
    from pmod.data.synth import question_kind
    from pmod.io.model_folder import encode
    from pmod.recipes.generate import answer

    correct, per_kind = 0, {}
    for start in range(0, len(test), batch_size):
        chunk = test[start : start + batch_size]
        questions = [question_and_answer(r) for r in chunk]
        images = [[record_image(data, r, blank_images)] for r in chunk]
        texts, _ = answer(model, processor, [q for q, _ in questions], images, max_new_tokens=3, temperature=0.0)
        for (question, truth), text in zip(questions, texts):
            words = text.strip().split()
            ok = bool(words) and words[0].lower() == truth.lower()
            correct += ok
            kind = question_kind(question)
            per_kind.setdefault(kind, [0, 0])
            per_kind[kind][0] += ok
            per_kind[kind][1] += 1
    sample = encode(processor, model, [question_and_answer(test[0])[0]], [[record_image(data, test[0])]])
    n_vision = int((sample["input_ids"] == model.config.image_token_id).sum())
    n_text = int(sample["input_ids"].shape[1]) - n_vision
    cost = estimate(model.config, n_vision=n_vision, n_text=n_text, dtype="float32").to_dict()
    key = "pmod" if get_method_config(model) is not None else "dense"  # VisionZip routes no layer, yet saves
    return {
        "accuracy": correct / len(test),
        "per_question_kind": {k: round(c / n, 3) for k, (c, n) in sorted(per_kind.items())},
        "prefill_tflops": cost[f"{key}_tflops"],
        "kv_bytes": cost[f"{key}_kv_bytes"],
        "mean_retention": cost["mean_retention"] if key == "pmod" else 1.0,
        "n_vision": n_vision,
        "n_text": n_text,
        "layer_ratios": layer_ratios(model),
    }


def measure_prefill(
    folders: dict[str, Path], data: Path, test: list[dict[str, Any]], reps: int = 5
) -> dict[str, float]:
    """Median prefill latency (ms) of one batch of test prompts, the variants measured alternately."""
    return measure_prefill_models({name: load_variant(folder) for name, folder in folders.items()}, data, test, reps)


def measure_prefill_models(
    loaded: dict[str, tuple[torch.nn.Module, Any]], data: Path, test: list[dict[str, Any]], reps: int = 5
) -> dict[str, float]:
    """:func:`measure_prefill` of loaded models and their processors."""
    from pmod.io.model_folder import encode

    chunk = test[:16]
    inputs = {
        name: encode(
            processor, model, [question_and_answer(r)[0] for r in chunk], [[record_image(data, r)] for r in chunk]
        )
        for name, (model, processor) in loaded.items()
    }
    times: dict[str, list[float]] = {name: [] for name in loaded}
    with torch.inference_mode():
        for rep in range(reps + 1):
            for name, (model, _) in loaded.items():
                started = time.perf_counter()
                model(**inputs[name], use_cache=False)
                if rep:  # the first round warms up
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}
