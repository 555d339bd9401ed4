"""The report of ``pmod demo``: accuracy next to cost, what the routers learned, how the task was chosen, plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmod.analysis import plots as plotting
from pmod.core.files import atomic_write_text
from pmod.experiments.demo import DemoSettings
from pmod.experiments.demo_runs import (
    load_variant,
    parallel_workers,
    question_and_answer,
    record_image,
    threads_per_worker,
)
from pmod.recipes.viz import image_routing


def prior_baseline(data: Path, test: list[dict[str, Any]]) -> float:
    """Accuracy of answering each test question with its most frequent training answer, without the image:
    what a model gets from answer priors alone."""
    from collections import Counter

    answers: dict[str, Counter] = {}
    for record in json.loads((data / "train.json").read_text()):
        if record.get("image"):
            question, truth = question_and_answer(record)
            answers.setdefault(question, Counter())[truth] += 1
    hits = [answers.get(q, Counter({"": 1})).most_common(1)[0][0] == a for q, a in map(question_and_answer, test)]
    return sum(hits) / len(hits)


def shape_concentration(
    model: torch.nn.Module, processor: Any, data: Path, test: list[dict[str, Any]], n: int = 32
) -> dict[int, dict]:
    """Per routed layer: the share of kept vision tokens that touch a shape, against the share of all tokens that do.

    A router that learned the task keeps shape tokens more often than chance (precision > base rate).
    """

    stats: dict[int, list[tuple[float, float, float]]] = {}
    for record in test[:n]:
        routing = image_routing(model, processor, record_image(data, record), question_and_answer(record)[0])
        on_shape = shape_tokens(record, routing.grid, np.asarray(routing.image).shape[0])
        for layer, kept in zip(routing.layers, routing.kept):
            kept = kept[: on_shape.size]
            precision = float(on_shape[kept].mean()) if kept.any() else 0.0
            recall = float(kept[on_shape].mean()) if on_shape.any() else 0.0
            stats.setdefault(layer, []).append((precision, recall, float(on_shape.mean())))
    return {
        layer: {
            "kept_on_shape": round(float(np.mean([s[0] for s in v])), 3),
            "shape_tokens_kept": round(float(np.mean([s[1] for s in v])), 3),
            "base_rate": round(float(np.mean([s[2] for s in v])), 3),
        }
        for layer, v in sorted(stats.items())
    }


def shape_tokens(record: dict[str, Any], grid: tuple[int, int], size: int) -> np.ndarray:
    rows, cols = grid
    on = np.zeros((rows, cols), dtype=bool)
    cell = size / rows
    for shape in record["meta"]["shapes"]:
        x0, y0, x1, y1 = shape["bbox"]
        on[int(y0 // cell) : int(y1 // cell) + 1, int(x0 // cell) : int(x1 // cell) + 1] = True
    return on.reshape(-1)


#: What tuning the shapes task measured, for its report (runs of 150-1000 steps on the 2-core CI machine).
SHAPES_HISTORY = """\
How this task was chosen (measured while tuning the demo; the loss of a model that ignores the image sits at the
answer priors):

- Every part trained from scratch together (1-3 shapes per image; colour, shape, count, position and yes/no
  questions): after 260-1000 steps, at hidden 64-128, lr 1e-3-2e-3, with 8 or 16 px patches, the loss stayed at
  the answer priors and accuracy at the prior baseline (dense 0.320 vs prior 0.345 at the old default).
- One question family at a time, tower trained from scratch, 300 steps: "What color is the shape?" on one-shape
  images learned (0.97 after 200 steps). "Is there a <color> shape?" did not (2, 4 and 12 layers, up to 800 steps,
  question before or after the image): it needs two hops (the colour word, then matching patches). "What shape is in
  the image?" and "Is the shape on the left or the right?" stayed at chance.
- A tower pre-trained on per-patch labels and then frozen, as LLaVA freezes CLIP
  (`pmod.experiments.vision_pretrain`): colour questions reached 1.00 within 100 steps. Shape-kind questions stayed near
  chance (0.41-0.43 after 300 steps): the small tower does not learn to tell outlines apart (held-out shape-kind
  accuracy on shape patches about 0.3-0.37, chance 0.25), so the demo does not ask them.
- Position ("left or right?") questions, dense, batch 32, one or two questions per image: chance after 200 steps
  with only row/column tower targets; 0.56 with a left/right target on every patch (0.98 in a hand-written loop, not
  in the `pmod train` recipe); with that target on shape patches only, 0.61 after 200 steps, 0.71 after 300 and
  0.98 after 400. A constant learning rate (0.44), lr 2e-3 (0.56) and batch 16 for 400 steps (0.59) did not help.
  Asking both questions about every image doubles the position answers per step: 1.00 after 250 steps (p-MoD
  0.99 in that tuning run, whose warmup was 10 steps). The variants train side by side, one per core, to keep the
  default run within 10 minutes.
- Two- and three-shape images need the decoder to bind a word to an object (two hops), which did not learn in time,
  so each image holds one shape.
"""


#: What designing the scenes task measured (BENCHMARKS.md, "A task that tells the methods apart"), for its report.
SCENES_HISTORY = """\
How this task was chosen (runs of the demo's dense model, 250 steps unless noted, 200-289 held-out questions):

- The shapes task (one shape, colour and position) is learned to 0.84-1.00, but a few tokens carry each answer:
  keeping a quarter of the vision tokens from layer 2 costs the dense model 1.8 points (FastV's choice) or 3.1
  (random), and every trained method scores alike, so it cannot tell methods apart.
- Scenes of 3-8 shapes among grey speckle. The questions that name a colour, a kind or a grid cell (`count_color`,
  `count_shape`, `exists`, `relation`, `cell`) stay at their answer priors within 250-1000 steps: the small decoder,
  trained from scratch, does not learn to look up what a question names (also with the question before the image,
  4 questions per image, hidden 192, lr 2e-3). The scene-wide kinds are learned: `count` 0.97-1.00, `half` 0.6-0.8.
- With the tower's attention on, the tower gathers the count into every token, so on some seeds a quarter of the
  tokens still holds it. The patch-local tower (attention outputs zero: each token sees its own patch) is learned as
  well (dense 0.855 / 0.840 / 0.890 on 3 seeds) and leaves the count spread over the shape tokens.
- Where the decoder reads the count depends on its initialisation: some seeds read it in layers 0-1, before any
  method drops a token, and lose little to a quarter of the tokens; others lose 30-60 points. 128 px images (256
  tokens) did not move the reading later. The report's task-check rows (`pmod ablate`) show which case a seed is.
"""

#: Each task's tuning history, for the report's "How the task was chosen".
TUNING_HISTORY: dict[str, str] = {"scenes": SCENES_HISTORY, "shapes": SHAPES_HISTORY}


def seeds_section(seeds: dict[str, dict[int, dict[str, Any]]], settings: DemoSettings) -> tuple[list[str], dict]:
    """``pmod demo --seeds N``: accuracy per seed and variant, and each variant's paired gap to dense (mean and
    spread over seeds) against the 2-point goal. Returns the markdown lines and the JSON summary."""
    from pmod.experiments.ablate_report import describe_difference, goal_clause, paired_difference

    order = sorted({s for runs in seeds.values() for s in runs})
    kinds = sorted({k for runs in seeds.values() for r in runs.values() for k in r["per_question_kind"]})
    lines = ["## Seeds", "", f"Every variant trained with seeds {order} (same data, tower and steps; a seed sets the "
             "projector's, decoder's and routers' initialisation and the data order). The table above is seed "
             f"{order[0]}'s run: one draw from the spread below.", "",
             "| variant | seed | accuracy | " + " | ".join(kinds) + " |", "|" + "---|" * (3 + len(kinds))]  # fmt: skip
    for name, runs in seeds.items():
        for seed in order:
            if seed in runs:
                r = runs[seed]
                kind_cells = " | ".join(f"{r['per_question_kind'].get(k, float('nan')):.3f}" for k in kinds)
                lines.append(f"| {name} | {seed} | {r['accuracy']:.3f} | {kind_cells} |")
    accuracy = {name: {s: r["accuracy"] for s, r in runs.items()} for name, runs in seeds.items()}
    gaps = {name: paired_difference(accuracy[name], accuracy["dense"]) for name in seeds if name != "dense"}
    lines.append("")
    summary = []
    for name, gap in gaps.items():
        text = f"{name}: {describe_difference(gap, 'dense')}"
        if gap is not None and gap["sd"] is not None:
            text += f"; {goal_clause(gap['mean'])}"
        summary.append(text + ".")
    lines += [f"- {t}" for t in summary] + [""]
    return lines, {"accuracy": accuracy, "gap_points": gaps, "summary": " ".join(summary)}


def write_report(
    out: Path,
    settings: DemoSettings,
    runs,
    results,
    data: Path,
    test,
    vision: dict[str, Any] | None = None,
    seeds: dict[str, dict[int, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Plots, report.md and the report dict (table, per-variant results, routing analysis; with ``seeds``, the
    results of every variant per seed, the gap to dense over seeds)."""
    workers = parallel_workers(settings)
    plots = {"loss": plotting.plot_loss_curves({n: tuple(zip(*r["loss"])) for n, r in runs.items()}, out / "loss.png")}
    dense = results["dense"]
    table = results_table(results)
    routing_md, concentration, routing_plots = routing_section(out, runs, results, data, test)
    plots.update(routing_plots)
    acc_gap = {n: round(100 * (r["accuracy"] - dense["accuracy"]), 1) for n, r in results.items() if n != "dense"}
    prior = prior_baseline(data, test)
    seeds_md, seeds_json = seeds_section(seeds, settings) if seeds else ([], None)
    md = [
        "# pmod demo report",
        "",
        setup_paragraph(settings, dense["n_vision"], len(test)),
        "",
        vision_paragraph(vision),
        "",
        table,
        "",
        "Accuracy difference vs dense (points): " + ", ".join(f"{n} {g:+.1f}" for n, g in acc_gap.items()),
        "",
        prior_paragraph(prior, dense["accuracy"]),
        "",
        *seeds_md,
        cost_paragraph(workers),
        "",
        "Per question kind (accuracy):",
        "",
        *[f"- {n}: {results[n]['per_question_kind']}" for n in results],
        routing_md,
        *closing_lines(plots, settings.task),
    ]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {
        "settings": settings.to_dict(),
        "results": {n: dict(r) for n, r in results.items()},
        "accuracy_gap_points": acc_gap,
        "prior_baseline_accuracy": prior,
        "parallel_workers": workers,
        "vision_pretraining": None if vision is None else {"accuracy": vision["accuracy"], "loss": vision["loss"]},
        "shape_concentration": concentration,
        "loss": {n: r["loss"] for n, r in runs.items()},
        "plots": {k: Path(p).name for k, p in plots.items()},
        "table": table,
        **({"seeds": seeds_json, "seeds_summary": seeds_json["summary"]} if seeds_json else {}),
    }


def closing_lines(plots: dict[str, Path], task: str) -> list[str]:
    """The report's last sections: how ``task`` was chosen, and the plots."""
    return ["## How the task was chosen", "", TUNING_HISTORY[task], "## Plots", "",
            *[f"![{k}]({Path(p).name})" for k, p in plots.items()]]  # fmt: skip


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown table: per variant its accuracy, analytic cost, measured prefill time and training time, each
    cost also as a share of dense's."""
    dense = results["dense"]
    header = (
        "| variant | accuracy | prefill TFLOPs | vs dense | KV bytes | vs dense | prefill ms | vs dense | train s |"
    )
    lines = [header, "|" + "---|" * 9]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['accuracy']:.3f} | {r['prefill_tflops']:.6f} "
            f"| {r['prefill_tflops'] / dense['prefill_tflops']:.1%} "
            f"| {r['kv_bytes']} | {r['kv_bytes'] / dense['kv_bytes']:.1%} | {r['prefill_ms']:.1f} "
            f"| {r['prefill_ms'] / dense['prefill_ms']:.2f}x | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def routing_section(
    out: Path, runs: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]], data: Path, test: list[dict]
) -> tuple[str, dict[str, dict], dict[str, Path]]:
    """Per routed variant: its schedule, heatmap and kept-token overlays plotted into ``out``, and what its routers
    learned (:func:`shape_concentration`). Returns the markdown, the concentration per variant and the plots."""
    routing_md, concentration, plots = "", {}, {}
    for name in (n for n in results if n != "dense"):
        plots[f"{name}_schedule"] = plotting.plot_schedule(results[name]["layer_ratios"], out / f"{name}_schedule.png")
        model, processor = load_variant(runs[name]["folder"])
        for i, record in enumerate(test[:3]):
            routing = image_routing(model, processor, record_image(data, record), question_and_answer(record)[0])
            if i == 0:
                plots[f"{name}_heatmap"] = plotting.plot_token_heatmap(routing, out / f"{name}_heatmap.png")
            plots[f"{name}_overlay_{i}"] = plotting.plot_kept_overlay(routing, out / f"{name}_overlay_{i}.png")
        concentration[name] = shape_concentration(model, processor, data, test)
        routing_md += concentration_md(name, concentration[name])
    return routing_md, concentration, plots


def concentration_md(name: str, concentration: dict[int, dict]) -> str:
    """One routed variant's section: whether its kept tokens concentrate on the shapes, and the per-layer table."""
    lift = np.mean([d["kept_on_shape"] / max(d["base_rate"], 1e-9) for d in concentration.values()])
    verdict = "kept tokens concentrate on the shapes" if lift > 1.2 else "kept tokens do NOT concentrate on the shapes"
    text = (
        f"\n### {name}: what the routers learned\n\nAveraged over p-MoD layers, {verdict}: the share "
        f"of kept tokens that touch a shape is {lift:.2f}x the share of all tokens that do.\n\n"
        "| layer | kept tokens on a shape | shape tokens kept | tokens on a shape (base rate) |\n"
        "|---|---|---|---|\n"
    )
    for layer, d in concentration.items():
        text += f"| {layer} | {d['kept_on_shape']:.3f} | {d['shape_tokens_kept']:.3f} | {d['base_rate']:.3f} |\n"
    return text


def setup_paragraph(settings: DemoSettings, n_vision: int, n_test: int) -> str:
    """The task, the model, how the tower was pre-trained, the training budget and how accuracy is scored."""
    return (
        f"Task: {settings.task_summary()}, {n_vision} vision tokens per image. Model: a small "
        "LLaVA (ViT tower "
        f"{settings.vision_layers} layers, 2-layer MLP projector, {settings.layers}-layer Llama decoder of hidden size "
        f"{settings.hidden}, word-level tokenizer). No pre-trained vision tower exists here, so the tower is first "
        f"pre-trained for {settings.vision_pretrain_steps} steps on per-patch labels of the training images "
        "(`pmod.experiments.vision_pretrain`, a stand-in for CLIP) and then frozen, as in LLaVA's recipe; the "
        f"projector and the decoder start from random weights. Each variant: {settings.training_summary()}, "
        f"same seed and data. Accuracy: exact match of the first answer word on {n_test} "
        "held-out image questions."
    )


def vision_paragraph(vision: dict[str, Any] | None) -> str:
    """The tower pre-training's held-out per-patch accuracy ("" without a pre-training result)."""
    if vision is None:
        return ""
    acc = vision["accuracy"]
    return (
        "Vision tower pre-training, held-out per-patch accuracy: colour on shape patches "
        f"{acc['color_on_object']:.3f}, shape kind on shape patches {acc['shape_on_object']:.3f}, left/right half "
        f"on shape patches {acc['side_on_object']:.3f}, row {acc['row']:.3f}, column {acc['column']:.3f} "
        "(coordinates rounded to a patch)."
    )


def prior_paragraph(prior: float, dense_accuracy: float) -> str:
    """The answer-prior baseline, and whether the dense model is far enough above it for the comparison to say
    anything."""
    learned = dense_accuracy - prior
    return f"Answer-prior baseline (each question's most frequent training answer, no image): {prior:.3f}. " + (
        f"The dense model is {100 * learned:.1f} points above it, so it uses the image."
        if learned > 0.05
        else f"The dense model is only {100 * learned:+.1f} points from it: at this training budget neither model "
        "has learned to use the image beyond answer priors, so the accuracy comparison says little about p-MoD. "
        "Train longer (`--steps`) for a meaningful comparison."
    )


def cost_paragraph(workers: int) -> str:
    """How the costs were obtained, and how the variants' training shared the machine."""
    return (
        "TFLOPs and KV bytes are analytic (`pmod flops`, fp32, one prompt); prefill ms is measured on this machine "
        "(median of 5 forwards over 16 test prompts, variants alternating). "
        + (
            f"The variants trained side by side, {workers} worker processes of "
            f"{threads_per_worker(workers)} thread(s) each, so train s is the wall time of each run "
            "while the others ran."
            if workers > 1
            else "The variants trained one after the other."
        )
    )
