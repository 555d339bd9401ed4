"""`pmod arank`: gamma-MoD's attention rank (ARank) of every decoder layer of a dense model, on LLaVA-format samples.

Prints the per-layer values (or JSON with ``--json``) and the layers gamma-MoD would convert (those below the
``--threshold-rank``-th largest value); writes a bar plot with ``--plot FILE`` and the JSON with ``--out FILE``,
nothing otherwise. The JSON is what ``GammaMoDConfig(arank_file=...)``
and ``pmod train --method gamma_mod --gamma-mod-arank-file`` read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pmod.core.config import stored_method_config
from pmod.core.errors import UserError
from pmod.core.files import atomic_write_json
from pmod.methods.gamma_mod import choose_layers
from pmod.recipes.parsing import check_output_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a dense LLaVA / LLaVA-NeXT model folder")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL samples")
    parser.add_argument("--image-folder", help="image root (default: the data file's folder)")
    parser.add_argument("--samples", type=int, default=50, help="samples to average over (the paper: 50)")
    parser.add_argument(
        "--variant",
        choices=["scores", "softmax"],
        default="scores",
        help="scores: rank of pre-softmax Q K^T (the paper's Eq. 5); softmax: post-softmax causal attention with "
        "the diagonal zeroed (the original code)",
    )
    parser.add_argument("--threshold-rank", type=int, default=4, help="the k-th largest ARank is the threshold")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--plot", help="write a bar plot of the values to this PNG file (default: no plot)")
    parser.add_argument("--out", help="also write the JSON result to this file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    plot_file, out_file = check_arguments(args)  # before the model loads
    values, count, bad_samples = measure(args)
    chosen = choose_layers(values, args.threshold_rank)
    threshold = sorted(values, reverse=True)[args.threshold_rank - 1]
    result = {
        "model": str(args.model),
        "samples": count,
        "variant": args.variant,
        "arank": values,
        "threshold_rank": args.threshold_rank,
        "threshold": threshold,
        "mod_layers": chosen,
        "bad_samples": bad_samples,
    }
    if plot_file is not None:
        from pmod.analysis.plots import plot_arank

        result["plot"] = str(plot_arank(values, threshold, chosen, plot_file))
    if out_file is not None:
        atomic_write_json(out_file, result)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(result, args.data, plot_file)
    return 0


def check_arguments(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """Every mistake in the arguments, as one line, before the model loads; returns the ``--plot`` and ``--out``
    files (None: not asked for)."""
    from pmod.io.model_folder import check_model_folder

    if args.samples < 1:
        raise UserError(f"--samples is {args.samples}; give at least 1")
    if args.threshold_rank < 1:
        raise UserError(f"--threshold-rank is {args.threshold_rank}; give at least 1")
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data} does not exist; pass a LLaVA-format JSON or JSONL file")
    config = check_model_folder(args.model, "pmod arank")
    if stored_method_config(config) is not None:
        raise UserError(f"{args.model} is already converted; ARank is measured on the dense model before conversion")
    from pmod.analysis.dims import LMDims

    layers = LMDims.from_config(config).layers
    if args.threshold_rank > layers:
        raise UserError(f"--threshold-rank is {args.threshold_rank} but the model has {layers} layers; give at most "
                        f"{layers} (the paper: 4)")  # fmt: skip
    plot_file = check_output_file(args.plot, "--plot") if args.plot else None
    out_file = check_output_file(args.out, "--out") if args.out else None
    return plot_file, out_file


def measure(args: argparse.Namespace) -> tuple[list[float], int, int]:
    """The ARank of every decoder layer of ``--model``, averaged over its first ``--samples`` samples; with the
    number of samples used and of bad samples skipped."""
    from pmod.data.batching import LlavaCollator
    from pmod.data.dataset import LlavaDataset
    from pmod.io.model_folder import load_model
    from pmod.methods.gamma_arank import layer_aranks

    model, processor = load_model(args.model, args.device, "pmod arank")
    model = model.float() if model.device.type == "cpu" else model
    dataset = LlavaDataset(args.data, processor, image_folder=args.image_folder, max_length=args.max_length)
    collate = LlavaCollator.from_tokenizer(processor.tokenizer)
    count = min(args.samples, len(dataset))

    def batches():
        for i in range(count):
            batch = collate([dataset[i]])
            batch.pop("labels", None)
            yield {k: v.to(model.device) for k, v in batch.items()}

    values = layer_aranks(model, batches(), args.variant)
    return values, count, len(dataset.bad_samples)  # bad samples are found while the batches are read


def print_table(result: dict, data: str, plot_file: Path | None) -> None:
    """The per-layer values and which layers gamma-MoD would convert, as text; the plot's path on stderr."""
    values, chosen, rank = result["arank"], result["mod_layers"], result["threshold_rank"]
    print(f"ARank ({result['variant']}) over {result['samples']} samples of {data}; head dim bounds it")
    for i, value in enumerate(values):
        print(f"  layer {i:3d}  {value:8.2f}  {'MoD' if i in chosen else 'dense'}")
    print(f"threshold (the {rank}th largest): {result['threshold']:.2f}; MoD layers: {chosen}")
    if plot_file is not None:
        print(f"plot: {plot_file}", file=sys.stderr)
