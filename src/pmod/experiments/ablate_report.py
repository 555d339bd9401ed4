"""The report of ``pmod ablate``: per row the accuracy over seeds next to the cost, whether each difference from
dense and from p-MoD is larger than the seed spread, the budgets the rows were held to, and plots.

Differences are paired by seed (a seed fixes the initialisation and the data order of every variant): for each seed
the row's accuracy minus the other row's, in points; the report gives their mean and sample standard deviation
(the seed spread), and calls a difference larger than the spread when ``|mean| > sd``. With three seeds this is a
rough screen, not a significance test.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmod.analysis import plots as plotting
from pmod.core import schedules
from pmod.core.config import method_class
from pmod.core.files import atomic_write_text
from pmod.experiments.ablate_variants import GROUPS, VARIANTS, Workload
from pmod.experiments.demo import DemoSettings
from pmod.experiments.demo_report import prior_baseline

#: The p-MoD vs dense gap the demo aims for (points): p-MoD at most this far below dense.
GAP_GOAL = 2.0


def goal_clause(mean: float) -> str:
    """Whether a mean accuracy difference from dense (points) meets the goal; a row above dense meets it too."""
    if mean >= -GAP_GOAL:
        return f"the mean is within the {GAP_GOAL:.0f}-point goal (at most {GAP_GOAL:.0f} points below dense)"
    return f"the mean is outside the {GAP_GOAL:.0f}-point goal (more than {GAP_GOAL:.0f} points below dense)"


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_difference(rows: dict[int, float], reference: dict[int, float]) -> dict[str, Any] | None:
    """Per-seed accuracy differences ``rows - reference`` in points over the seeds both have, their mean and
    spread (sample sd), and whether the mean is larger than the spread. None without a common seed."""
    seeds = sorted(set(rows) & set(reference))
    if not seeds:
        return None
    diffs = [100 * (rows[s] - reference[s]) for s in seeds]
    mean, sd = mean_sd(diffs)
    return {
        "points": [round(d, 2) for d in diffs],
        "seeds": seeds,
        "mean": round(mean, 2),
        "sd": None if sd is None else round(sd, 2),
        "larger_than_spread": None if sd is None else abs(mean) > sd + 1e-9,
    }


def describe_difference(diff: dict[str, Any] | None, other: str) -> str:
    """A clause such as "1.5 points below dense (-1.5 +- 0.5 over 3 seeds): larger than the seed spread"."""
    if diff is None:
        return f"no common seed with {other}"
    mean, sd, n = diff["mean"], diff["sd"], len(diff["seeds"])
    if sd is None:
        return f"{mean:+.1f} points vs {other} on one seed: no spread to compare with (run more --seeds)"
    if mean == 0 and sd == 0:
        return f"the same accuracy as {other} on every seed"
    where = "above" if mean > 0 else "below"
    verdict = "larger than the seed spread" if diff["larger_than_spread"] else "within the seed spread"
    return f"{abs(mean):.1f} points {where} {other} ({mean:+.1f} ± {sd:.1f} over {n} seeds): {verdict}"


def summarize(settings: Any, results: dict[str, dict], failures: dict[str, str], latency: dict[str, float]) -> dict:
    """One summary per row: accuracy over seeds, per question kind, cost ratios against dense, latency, training
    time, non-finite events, and the paired differences from dense and p-MoD."""
    accuracy = {
        name: {s: results[f"{name}/seed{s}"]["accuracy"] for s in settings.seeds if f"{name}/seed{s}" in results}
        for name in settings.variants
    }
    rows = {}
    for name in settings.variants:
        runs = [results[f"{name}/seed{s}"] for s in settings.seeds if f"{name}/seed{s}" in results]
        dense = [results.get(f"dense/seed{r['seed']}") for r in runs]
        row: dict[str, Any] = {
            "label": VARIANTS[name].label,
            "group": VARIANTS[name].group,
            "meaning": VARIANTS[name].meaning,
            "failed": {k: v for k, v in failures.items() if k.startswith(f"{name}/")},
            "accuracy": accuracy[name],
        }
        if runs:
            acc_mean, acc_sd = mean_sd(list(accuracy[name].values()))
            kinds = sorted({k for r in runs for k in r["per_question_kind"]})
            pairs = [(r, d) for r, d in zip(runs, dense) if d is not None]
            row.update(
                accuracy_mean=acc_mean,
                accuracy_sd=acc_sd,
                per_question_kind={k: statistics.fmean(r["per_question_kind"].get(k, 0.0) for r in runs)
                                   for k in kinds},
                tflops_ratio=statistics.fmean(r["prefill_tflops"] / d["prefill_tflops"] for r, d in pairs)
                if pairs else None,
                kv_ratio=statistics.fmean(r["kv_bytes"] / d["kv_bytes"] for r, d in pairs) if pairs else None,
                mean_retention=statistics.fmean(r["mean_retention"] for r in runs),
                train_seconds=statistics.fmean(r["train_seconds"] for r in runs),
                train_cpu_seconds=statistics.fmean(r.get("train_cpu_seconds", 0.0) for r in runs),
                nonfinite_loss_steps=sum(r["nonfinite_loss_steps"] for r in runs),
                nonfinite_parameters=sum(r["nonfinite_parameters"] for r in runs),
                method=runs[0]["method"],
                config=runs[0]["config"],
                configs={r["seed"]: r["config"] for r in runs},
                layer_ratios=runs[0]["layer_ratios"],
            )  # fmt: skip
        if name in latency and "dense" in latency:
            row.update(prefill_ms=latency[name], latency_ratio=latency[name] / latency["dense"])
        if name != "dense":
            row["vs_dense"] = paired_difference(accuracy[name], accuracy.get("dense", {}))
        if name != "pmod" and "pmod" in accuracy:
            row["vs_pmod"] = paired_difference(accuracy[name], accuracy["pmod"])
        rows[name] = row
    return rows


def _cell(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    text = f"{diff['mean']:+.1f}" + ("" if diff["sd"] is None else f" ± {diff['sd']:.1f}")
    return f"**{text}**" if diff["larger_than_spread"] else text


def table(rows: dict[str, dict]) -> str:
    """The markdown table: one line per row, group headings between."""
    kinds = sorted({k for r in rows.values() for k in r.get("per_question_kind", {})})
    header = ["row", "accuracy (mean ± sd)", *kinds, "TFLOPs", "KV", "prefill latency", "train s (CPU s)",
              "NaN/Inf steps", "vs dense (points)", "vs p-MoD (points)"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    group = None
    for r in rows.values():
        if r["group"] != group:
            group = r["group"]
            lines.append(f"| *{GROUPS[group]}* |" + " |" * (len(header) - 1))
        if "accuracy_mean" not in r:
            lines.append(f"| {r['label']} | failed |" + " |" * (len(header) - 2))
            continue
        sd = "" if r["accuracy_sd"] is None else f" ± {r['accuracy_sd']:.3f}"
        latency = f"{r['latency_ratio']:.2f}x" if "latency_ratio" in r else "-"
        cells = [
            r["label"],
            f"{r['accuracy_mean']:.3f}{sd}",
            *[f"{r['per_question_kind'].get(k, float('nan')):.3f}" for k in kinds],
            "-" if r["tflops_ratio"] is None else f"{r['tflops_ratio']:.1%}",
            "-" if r["kv_ratio"] is None else f"{r['kv_ratio']:.1%}",
            latency,
            f"{r['train_seconds']:.0f} ({r['train_cpu_seconds']:.0f})" if r["train_seconds"] else "0 (no training)",
            f"{r['nonfinite_loss_steps']}",
            _cell(r.get("vs_dense")),
            _cell(r.get("vs_pmod")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def row_sentences(rows: dict[str, dict]) -> list[str]:
    """One sentence per row: its difference from dense and from p-MoD against the seed spread."""
    out = []
    for name, r in rows.items():
        if name == "dense" or "accuracy_mean" not in r:
            continue
        parts = [describe_difference(r.get("vs_dense"), "dense")]
        if "vs_pmod" in r:
            parts.append(describe_difference(r["vs_pmod"], "p-MoD"))
        out.append(f"- **{r['label']}**: " + "; ".join(parts) + ".")
    return out


def gap_statement(rows: dict[str, dict], budget: str) -> str:
    """The p-MoD vs dense gap with its spread, against the 2-point goal."""
    diff = rows.get("pmod", {}).get("vs_dense")
    if diff is None:
        return ""
    per_seed = ", ".join(f"seed {s}: {d:+.1f}" for s, d in zip(diff["seeds"], diff["points"]))
    if diff["sd"] is None:
        return f"p-MoD vs dense at {budget}: {diff['mean']:+.1f} points on one seed ({per_seed}); one seed does " \
               "not tell a gap from run-to-run noise (run more seeds)."  # fmt: skip
    return (
        f"p-MoD vs dense at {budget}: {diff['mean']:+.1f} ± {diff['sd']:.1f} points over {len(diff['seeds'])} seeds "
        f"({per_seed}); {goal_clause(diff['mean'])}, and the difference is "
        f"{'larger than' if diff['larger_than_spread'] else 'within'} the seed spread."
    )


def plot_accuracy_vs_cost(rows: dict[str, dict], path: Path) -> Path:
    """:func:`accuracy_vs_cost_figure` saved to ``path``."""
    import matplotlib.pyplot as plt  # the Agg backend is chosen by pmod.analysis.plots

    fig = accuracy_vs_cost_figure(rows)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the label column lies outside the axes
    plt.close(fig)
    return path


def accuracy_vs_cost_figure(rows: dict[str, dict]) -> Any:
    """Accuracy (mean, error bar = sd over seeds, cut at 0 and 1) against analytic TFLOPs (share of dense), one
    point per row. The rows' labels stand in a column right of the axes, each joined to its point by a line and
    moved only as far as needed not to overlap (a ladder at equal cost puts several points close together); rows on
    the same spot share one label listing them."""
    import matplotlib.pyplot as plt  # the Agg backend is chosen by pmod.analysis.plots

    colors = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(v.group for v in VARIANTS.values()))}
    spots: list[tuple[float, float, list[str], str]] = []  # (x, y, labels, colour) of the points drawn so far
    points = [r for r in rows.values() if r.get("tflops_ratio") is not None]
    fig, ax = plt.subplots(figsize=(8.0, max(4.4, 1.6 + 0.16 * len(points))))
    fig.subplots_adjust(left=0.09, right=0.62, bottom=0.2, top=0.92)
    for r in points:
        x, y, sd = 100 * r["tflops_ratio"], r["accuracy_mean"], r["accuracy_sd"] or 0.0
        below, above = max(0.0, min(sd, y)), max(0.0, min(sd, 1.0 - y))  # an accuracy lies in [0, 1]
        ax.errorbar(x, y, yerr=[[below], [above]], fmt="o", capsize=3, color=colors[r["group"]], alpha=0.8)
        near = next((s for s in spots if abs(s[0] - x) < 2.0 and abs(s[1] - y) < 0.01), None)
        if near is None:
            spots.append((x, y, [r["label"]], colors[r["group"]]))
        else:
            near[2].append(r["label"])
    ax.set_ylim(-0.03, 1.03)
    _label_column(fig, ax, spots)
    for group, color in colors.items():
        ax.plot([], [], "o", color=color, label=group)
    ax.set(xlabel="analytic prefill TFLOPs (% of dense)", ylabel="accuracy (mean ± sd over seeds)",
           title="accuracy against cost")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    ax.grid(alpha=0.3)
    return fig


def _label_column(fig: Any, ax: Any, spots: list[tuple[float, float, list[str], str]]) -> None:
    """Each spot's label right of the axes, at its point's height where free, else moved up or down just enough
    (measured text heights, so no two labels overlap); in its group's colour, grey when it names several rows."""
    from matplotlib.text import Text

    low, high = ax.get_ylim()
    labels = [ax.annotate("\n".join(names), (x, y), xytext=(1.04, (y - low) / (high - low)), textcoords="axes fraction",
                          fontsize=7, color=color, va="center", ha="left", annotation_clip=False,
                          arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.5, "shrinkB": 4})
              for x, y, names, color in ((x, y, n, c if len(n) == 1 else "0.3") for x, y, n, c in spots)]  # fmt: skip
    if not labels:
        return
    renderer = fig.canvas.get_renderer()
    axes_height = ax.get_window_extent(renderer).height
    gap = 0.01
    order = sorted(range(len(labels)), key=lambda i: labels[i].get_position()[1])
    wanted = [labels[i].get_position()[1] for i in order]
    # Text's extent: an Annotation's own would include its line to the point
    half = [Text.get_window_extent(labels[i], renderer).height / axes_height / 2 + gap / 2 for i in order]
    place = list(wanted)
    for k in range(len(place)):  # upwards: each clear of the one below
        place[k] = max(wanted[k], place[k - 1] + half[k - 1] + half[k]) if k else max(wanted[k], half[k])
    place[-1] = min(place[-1], 1.0 - half[-1])
    for k in range(len(place) - 2, -1, -1):  # downwards from the top, where the column ran past it
        place[k] = min(place[k], place[k + 1] - half[k + 1] - half[k])
    for k, i in enumerate(order):
        labels[i].set_position((1.04, place[k]))


def mean_loss_curves(settings: Any, results: dict[str, dict]) -> dict[str, tuple[list[int], list[float]]]:
    """Per trained row, the training loss averaged over seeds at each logged step."""
    curves = {}
    for name in settings.variants:
        runs = [results[f"{name}/seed{s}"]["loss"] for s in settings.seeds if f"{name}/seed{s}" in results]
        runs = [run for run in runs if run]
        if runs:
            steps = [step for step, _ in runs[0]]
            losses = [statistics.fmean(run[i][1] for run in runs if i < len(run)) for i in range(len(steps))]
            curves[VARIANTS[name].label] = (steps, losses)
    return curves


def budgets_md(rows: dict[str, dict], workload: Workload) -> list[str]:
    """What each routed row was held to: ratios, layers, mean retention and TFLOPs against p-MoD's."""
    pmod = rows.get("pmod", {})
    lines = []
    for name, r in rows.items():
        config = r.get("config")
        if config is None:
            continue
        ratios = r["layer_ratios"]
        routed = [i for i, x in enumerate(ratios) if x is not None]
        # each layer's own rounding: FastV and DART keep round(n keep), the others floor(n ratio)
        plans = method_class(r["method"]).from_dict(config).layer_plan(len(ratios))
        kept = [schedules.kept_count(workload.n_vision, x, p.rounding) for x, p in zip(ratios, plans) if x is not None]
        where = f"routed layers {routed}, vision tokens each keeps {kept} of {workload.n_vision}"
        if r["method"] == "visionzip":  # no routed layer: the sequence is shortened before the decoder
            where = (f"no routed layer, {config['dominant']} dominant + {config['contextual']} contextual of "
                     f"{workload.n_vision} vision tokens per image reach every layer")  # fmt: skip
        text = (f"- {r['label']}: {where}, mean retention {r['mean_retention']:.4f}, TFLOPs "
                f"{r['tflops_ratio']:.2%} of dense")  # fmt: skip
        if pmod.get("tflops_ratio") and name != "pmod":
            text += f" ({r['tflops_ratio'] / pmod['tflops_ratio'] - 1:+.2%} vs p-MoD's)"
        if r["method"] == "pdrop":
            text += f"; lambda {config['keep']:.4f} at stage boundaries {config['layers']}"
        if name == "gamma_mod":
            layers = {seed: c["layers"] for seed, c in r["configs"].items()}
            text += f"; ARank-chosen layers per seed {layers}"
            if not any(layers.values()):
                text += (" (no layer's ARank was below the threshold, e.g. every layer at full rank: gamma-MoD ran as "
                         "the dense model)")  # fmt: skip
        lines.append(text + ".")
    return lines


def write_report(
    out: Path,
    settings: Any,
    results: dict[str, dict],
    failures: dict[str, str],
    latency: dict[str, float],
    workload: Workload,
    tower: dict[str, Any],
    workers: int,
    elapsed: float,
    test: list[dict[str, Any]],
    resumed: bool = False,
) -> dict[str, Any]:
    """Plots, report.md and the report dict. ``workers``: units that ran side by side; ``elapsed``: seconds the
    run took up to the report (``resumed``: this invocation's, which skipped finished units); ``test``: the held-out
    questions (for the answer-prior baseline)."""
    rows = summarize(settings, results, failures, latency)
    plots = report_plots(out, settings, results, rows)
    budget = settings.task.training_summary()
    md_table = table(rows)
    prior = prior_baseline(out / "data", test)
    smoke = ["**A `--quick` smoke run: tiny model and budget. Its numbers test the machinery and say nothing about the "
             "methods.**", ""] if settings.quick else []  # fmt: skip
    md = [
        "# pmod ablate report",
        "",
        *smoke,
        setup_paragraph(settings, workload, budget, prior, len(test)),
        "",
        md_table,
        "",
        method_paragraph(workers, elapsed, resumed),
        "",
        *findings_lines(rows, budget),
        *per_seed_lines(rows, settings.seeds),
        *["## Budgets", "", *budgets_md(rows, workload), ""],
        *["## What the rows mean", "", *[f"- **{VARIANTS[n].label}** (`{n}`): {VARIANTS[n].meaning}"
                                         for n in settings.variants], ""],  # fmt: skip
        *(["## Failed units", "", *[f"- {k}: {v}" for k, v in failures.items()], ""] if failures else []),
        "## Plots",
        "",
        *[f"![{k}]({p})" for k, p in plots.items()],
    ]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {
        "settings": settings.to_dict(),
        "workload": {"n_vision": workload.n_vision, "n_text": workload.n_text},
        "rows": rows,
        "failures": failures,
        "latency_ms": latency,
        "workers": workers,
        "resumed": resumed,
        "vision_pretraining": {"accuracy": tower.get("accuracy")},
        "prior_baseline_accuracy": prior,
        "plots": plots,
        "table": md_table,
    }


def report_plots(out: Path, settings: Any, results: dict[str, dict], rows: dict[str, dict]) -> dict[str, str]:
    """Accuracy against cost, and the mean loss curves of the trained rows (when any logged a loss), written into
    ``out``; returns their file names."""
    plots = {"accuracy_vs_tflops": plot_accuracy_vs_cost(rows, out / "accuracy_vs_tflops.png").name}
    curves = mean_loss_curves(settings, results)
    if curves:
        plots["loss"] = plotting.plot_loss_curves(curves, out / "loss.png").name
    return plots


def setup_paragraph(settings: Any, workload: Workload, budget: str, prior: float, n_test: int) -> str:
    """The task, the model, the budget and seeds every row shares, how accuracy is scored, and the answer-prior
    baseline."""
    task = settings.task
    demo_layers = DemoSettings().layers
    layers_note = (f"; the demo's decoder has {demo_layers} layers, fewer here fit every row and seed in time"
                   if task.layers != demo_layers else "")  # fmt: skip
    return (
        f"Task: {task.task_summary()}; {workload.n_vision} vision and {workload.n_text} text tokens per prompt. "
        f"Model: the demo's small LLaVA ({task.layers}-layer Llama decoder of hidden size "
        f"{task.hidden}{layers_note}, tower pre-trained on per-patch labels for {task.vision_pretrain_steps} steps "
        "and frozen). "
        f"Every row: {budget}, learning rate {task.learning_rate}, the same data and seeds {settings.seeds}. A seed "
        "sets the projector's, decoder's and routers' initialisation and the data order; data, tower and test "
        f"questions are shared. Accuracy: exact match of the first answer word on {n_test} held-out "
        f"image questions; answering each question with its most frequent training answer, without the image, "
        f"scores {prior:.3f}. Small models on a synthetic task: the rows' order is evidence about the methods at this "
        "scale, not a reproduction of the papers' numbers."
    )


def method_paragraph(workers: int, elapsed: float, resumed: bool) -> str:
    """How differences, costs, latency and training time are measured, and how long the run took."""
    return (
        "Accuracy differences are in points, paired by seed (mean ± sd over seeds); **bold**: larger than the seed "
        "spread. TFLOPs and KV are analytic (`pmod flops`, one prompt, fp32) as a share of dense; prefill latency "
        "is measured on this machine for the first seed's models (median of 7 forwards of 16 test prompts, the "
        "rows taking turns), as a ratio to dense. Train s: mean wall time of a seed's training, "
        + (f"{workers} units running side by side" if workers > 1 else "one unit at a time")
        + "; in brackets its CPU time (the wall time without other jobs' share of the cores). "
        + f"The whole run took {elapsed / 60:.1f} minutes on this machine"
        + (" (this invocation; the run was resumed)." if resumed else ".")
    )


def findings_lines(rows: dict[str, dict], budget: str) -> list[str]:
    """The "What each row says" section: a sentence per row, the p-MoD gap, and the non-finite counts."""
    nonfinite = sum(r.get("nonfinite_loss_steps", 0) for r in rows.values())
    bad_weights = sum(r.get("nonfinite_parameters", 0) for r in rows.values())
    return ["## What each row says", "", *row_sentences(rows), "", gap_statement(rows, budget), "",
            f"NaN/Inf: {nonfinite} training step(s) had a non-finite loss (skipped and counted, not fatal); "
            f"{bad_weights} trained model(s) ended with non-finite weights.", ""]  # fmt: skip


def per_seed_lines(rows: dict[str, dict], seeds: list[int]) -> list[str]:
    """The "Accuracy per seed" section: one table line per row, "-" where a seed has no result."""
    lines = ["## Accuracy per seed", "", "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|" + "---|" * (len(seeds) + 1)]  # fmt: skip
    for r in rows.values():
        lines.append(f"| {r['label']} | " + " | ".join(
            f"{r['accuracy'][s]:.3f}" if s in r["accuracy"] else "-" for s in seeds) + " |")  # fmt: skip
    return lines + [""]
