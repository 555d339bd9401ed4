"""`pmod eval`: evaluate model folders with lmms-eval (the field's harness) and report each task's own metric next
to the cost of the same requests, with ratios and bootstrap intervals against the first model (the dense
reference). Results land per (model, task) as they finish, keyed by what they measured (the model's folder and
files, its args, the task and ``--limit``); a rerun with the same ``--out`` reuses exactly those of the same
measurements, and keeps the others beside them. One run at a time writes an ``--out``.

    pmod eval --model pmod-demo/dense --model pmod-demo/pmod --tasks pmod_shapes --shapes-data pmod-demo/data \\
        --out eval-demo
    pmod eval --model llava-v1.5-7b-hf --model pmod-llava-v1.5-7b --tasks gqa,textvqa_val,mme,pope --out eval

A ``--model`` may carry model args after a comma, e.g. ``--model DIR,method=fastv,fastv_keep=0.25`` converts a
dense folder with FastV on the fly (likewise ``method=pdrop,pdrop_layers=[8,16,24],pdrop_keep=0.5`` and
``method=dart,dart_keep=0.222``: a list value in brackets). Multi-GPU runs use lmms-eval's own launcher:
``accelerate launch -m lmms_eval --model pmod ...`` (see docs/EVALUATION.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pmod.core.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="DIR[,ARGS]",
                        help="a model folder (pmod or Hugging Face LLaVA), repeatable; the first is the reference; "
                             "model args may follow: DIR,method=fastv,fastv_keep=0.25 or "
                             "DIR,method=pdrop,pdrop_layers=[8,16,24] (a list in brackets)")  # fmt: skip
    parser.add_argument("--tasks", required=True, help="comma-separated lmms-eval tasks (pmod_shapes, gqa, mme, ...)")
    parser.add_argument("--out", required=True,
                        help="results folder (a rerun with it reuses the results of the same model, settings, task "
                             "and limit; one run at a time writes it)")  # fmt: skip
    parser.add_argument("--limit", type=int, help="evaluate the first N documents of each task")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of extra lmms-eval task YAMLs (repeatable)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward (default: %(default)s)")
    parser.add_argument("--shapes-data", metavar="DIR",
                        help="folder of `pmod data synth` for the pmod_shapes tasks (default: $PMOD_SHAPES_DIR, "
                             "else data/shapes)")  # fmt: skip
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on a CPU), float32, ...")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--attn-implementation", help="sdpa, eager or flash_attention_2 (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="when a task sets none (default: %(default)s)")
    parser.add_argument("--budgets", metavar="B1,B2,...",
                        help="evaluate every routed model (a routed folder, or DIR,method=...) at each of these shares "
                             "of dense's TFLOPs (rows MODEL@0.40; dense models once) and plot the score against the "
                             "TFLOPs share, the measured KV and latency shares: accuracy_vs_tflops.png, "
                             "accuracy_vs_kv.png and accuracy_vs_latency.png in --out")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pmod.core.files import check_output_folder
    from pmod.eval import budgets
    from pmod.eval.model_args import method_from_args
    from pmod.eval.runner import ModelSpec, evaluate_models, label_models
    from pmod.io.model_folder import check_model_folder

    for flag, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-new-tokens", args.max_new_tokens)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{flag} is {value}; give a number >= 1.")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks names no task; give comma-separated lmms-eval task names, e.g. pmod_shapes.")
    wanted = budgets.parse_budgets(args.budgets) if args.budgets is not None else None
    specs = []
    for spec in map(ModelSpec.parse, args.model):  # every mistake in the models is found before anything loads
        config = check_model_folder(spec.folder, "pmod eval")
        settings = {k: v for k, v in spec.args.items() if k not in ("method", *MODEL_ARGS)}
        method = method_from_args(spec.args.get("method"), settings)
        specs += budgets.at_budgets(spec, config, method, wanted, lambda text: print(f"pmod eval: {text}",
                                                                                     file=sys.stderr))  # fmt: skip
    specs = label_models(specs)
    if args.shapes_data:
        if not (Path(args.shapes_data) / "test.json").is_file():
            raise UserError(f"--shapes-data {args.shapes_data} has no test.json; write the set with "
                            f"`pmod data synth --out {args.shapes_data}`.")  # fmt: skip
        os.environ["PMOD_SHAPES_DIR"] = str(Path(args.shapes_data).resolve())
    model_args = {"dtype": args.dtype, "device": args.device, "max_new_tokens": args.max_new_tokens}
    if args.attn_implementation:
        model_args["attn_implementation"] = args.attn_implementation
    out = check_output_folder(args.out, "--out")  # a file or an unwritable path: one line, before any loading
    report = evaluate_models(specs, tasks, out, args.limit, args.include_path, args.batch_size, model_args)
    print((out / "report.md").read_text())
    if wanted is not None:
        for measure, path in budgets.plot_all(report, out).items():
            print(f"pmod eval: score against {measure}: {path}", file=sys.stderr)
    missing = [t for t, rows in report["tasks"].items() if len(rows) < len(specs)]
    if missing:
        raise UserError(f"no score for every model on {', '.join(missing)}; see the log above.")
    return 0


#: Model args that are not method settings.
MODEL_ARGS = ("dtype", "device", "attn_implementation", "batch_size", "max_new_tokens", "chat_template", "cost_dir",
              "budget")
