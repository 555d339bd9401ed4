"""`pmod generate`: answer prompts about images with a routed (p-MoD, MoD, gamma-MoD, FastV) or dense LLaVA model
folder; ``--method fastv`` (with its ``--fastv-*`` settings) applies a training-free method to a dense folder as it
loads. ``--budget SHARE`` runs a routed folder (moved by :func:`pmod.set_budget`) or ``--method`` on a dense one at
that share of dense's analytic prefill TFLOPs.

One prompt streams its answer; ``--batch-file`` answers a JSONL file of ``{"image", "prompt"}`` records in batches
(left padding) and prints one JSON line per record. Either way the KV cache size is printed next to the size a
dense model would need for the same tokens.

torch, transformers and the model code are imported inside the functions that use them, so that
``pmod generate --help`` and flag errors answer without loading them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pmod.core.errors import UserError
from pmod.recipes import method_flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a routed or LLaVA model saved with save_pretrained")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    parser.add_argument("--prompt", help="the question")
    parser.add_argument("--video", action="append", default=[],
                        help="video file (needs PyAV) or folder of frame images (Qwen-VL, OneVision)")  # fmt: skip
    parser.add_argument("--frames", type=int, default=32, help="frames sampled evenly from each --video")
    parser.add_argument("--text-only", action="store_true", help="ask --prompt without an image")
    parser.add_argument("--batch-file", help='JSONL of {"image": PATH, "prompt": TEXT} records to answer in batches')
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    method_flags.add_on_the_fly_arguments(parser)
    parser.add_argument("--budget", type=float, metavar="SHARE", help="run at this share of dense's analytic "
                        "prefill TFLOPs for one image and --prompt (as pmod flops --budget): a routed folder moved "
                        "by pmod.set_budget (a trained method's routed shares scaled by one factor), or --method's "
                        "setting chosen; the setting chosen is printed")  # fmt: skip


def cache_report(cache: Any, tokens: int | None = None) -> str:
    """KV bytes of the cache next to what a dense model holds for the same tokens: every layer like layer 0, which
    caches every token it gets; ``tokens``, the positions a dense model caches per row, where the method shortened
    the sequence before the decoder (VisionZip: layer 0 holds fewer)."""
    from pmod.core.cache import kv_cache_bytes

    size = kv_cache_bytes(cache)
    dense = size.layer_bytes[0] * len(size.layer_bytes)  # layer 0 is always dense and caches every token
    if tokens is not None and size.layer_slots[0]:
        dense = dense * tokens // size.layer_slots[0]
    mib, share = 2**20, size.total_bytes / dense
    return f"KV cache: {size.total_bytes / mib:.2f} MiB (dense model: {dense / mib:.2f} MiB, {share:.1%})"


def answer(
    model, processor, prompts, images, max_new_tokens, temperature, streamer=None, videos=None
) -> tuple[list[str], str]:
    """Greedy (or sampled) answers to ``prompts`` with their images (and videos), and the KV-cache report."""
    import torch

    from pmod.core.cache import cache_of
    from pmod.io.model_folder import encode

    inputs = encode(processor, model, prompts, images, videos)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
            return_dict_in_generate=True,
            pad_token_id=processor.tokenizer.pad_token_id,
            **sampling,
        )
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    # generate caches every position but the last one it returns (VisionZip's prompt comes back as given)
    texts = processor.batch_decode(new, skip_special_tokens=True)
    return texts, cache_report(cache_of(out), out.sequences.shape[1] - 1)


def config_at_budget(
    folder: Path, data: dict[str, Any], config: Any, budget: float, prompt: str | None
) -> tuple[Any, dict[str, int]]:
    """(the method config the model of ``folder`` runs at ``budget``, the workload it is solved for: one image and
    ``prompt`` in the folder's prompt format), the choice printed to stderr. ``config``: a training-free method's,
    applied on the fly to a dense folder (its cost setting chosen); None for a routed folder (``data``: its
    config.json), which :func:`pmod.set_budget` moves once loaded (:func:`load_at_budget`): a trained method's
    routed shares scaled by one factor."""
    from pmod.analysis.budget import one_image_workload
    from pmod.analysis.dims import LMDims
    from pmod.core.config import stored_method_config
    from pmod.recipes.flops import QUESTION, prompt_text_tokens, settings_at_budget

    stored = stored_method_config(data)
    if config is None and stored is None:
        raise UserError(f"--budget chooses a training-free method's setting: pass --method with it ({folder} is "
                        f"dense, with no routed layers to move)")  # fmt: skip
    if config is None and not stored.routes_layers:
        raise UserError(f"--budget: {folder} runs {stored.method} before the decoder, which pmod.set_budget cannot "
                        f"move; pass its dense base folder with --method {stored.method} --budget")  # fmt: skip
    workload = one_image_workload(data, prompt_text_tokens(folder, prompt or QUESTION) or 1)
    if workload is None:
        raise UserError(f"--budget: {folder} has no vision config to count an image's tokens; drop --budget")
    dims = LMDims.from_config(data)
    if config is not None:
        return settings_at_budget("pmod generate", config, dims, budget, **workload), workload
    ratios = stored.layer_ratios(dims.layers)
    return settings_at_budget("pmod generate", stored, dims, budget, ratios=ratios, **workload), workload


def load_at_budget(args: argparse.Namespace, method_config: Any, data: dict[str, Any]) -> tuple[Any, Any]:
    """The model and processor of ``args.model`` (a dense one converted with ``method_config``), at ``--budget``
    when given: a training-free method's setting chosen before it is converted, a routed folder moved in place by
    :func:`pmod.set_budget` for the workload :func:`config_at_budget` solved (and printed) before loading."""
    from pmod.analysis.budget import set_budget
    from pmod.io.model_folder import load_model

    if args.budget is None:
        return load_model(args.model, args.device, "pmod generate", method_config)
    chosen, workload = config_at_budget(Path(args.model), data, method_config, args.budget, args.prompt)
    if method_config is not None:
        return load_model(args.model, args.device, "pmod generate", chosen)
    model, processor = load_model(args.model, args.device, "pmod generate")
    try:
        moved = set_budget(model, args.budget, **workload)
    except ValueError as err:
        raise UserError(f"--budget {args.budget}: {err}") from None
    if moved != chosen:  # the stored schedule and the loaded layers disagree: the line printed would be wrong
        raise RuntimeError(f"pmod.set_budget chose {moved} for the loaded model, not the {chosen} printed")
    return model, processor


def read_batch_file(path: str) -> list[dict[str, str]]:
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise UserError(f"cannot read batch file {path} ({err}); pass a JSONL file.") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove the line.") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path} line {number} needs a "prompt" string (and an optional "image" path).')
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    from pmod.data.images import open_image
    from pmod.io.model_folder import check_model_folder

    if (args.prompt is None) == (args.batch_file is None):
        raise UserError("give either --prompt (with --image) or --batch-file, not both or neither.")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1.")
    method_config = method_flags.on_the_fly_config(vars(args))
    data = check_model_folder(args.model, "pmod generate", method_config)  # before any weight is read
    if args.prompt is not None:
        if not args.image and not args.video and not args.text_only:
            raise UserError("no --image given: pass --image FILE for a question about an image (or --video FILE), "
                            "or --text-only to ask without one.")  # fmt: skip
        if (args.image or args.video) and args.text_only:
            raise UserError("--text-only excludes --image and --video; drop one.")
        from pmod.data.video import read_video_frames

        images = [[open_image(p) for p in args.image]]  # bad input fails before the model loads
        videos = [[read_video_frames(v, args.frames) for v in args.video]]
        model, processor = load_at_budget(args, method_config, data)
        import transformers

        streamer = transformers.TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        _, report = answer(model, processor, [args.prompt], images, args.max_new_tokens, args.temperature, streamer,
                           videos)  # fmt: skip
        print(report, file=sys.stderr)
        return 0

    from tqdm import tqdm

    records = read_batch_file(args.batch_file)
    base = Path(args.batch_file).parent
    for record in records:  # every image is checked before the model loads
        if record.get("image"):
            open_image(base / record["image"])
    model, processor = load_at_budget(args, method_config, data)
    for start in tqdm(range(0, len(records), args.batch_size), desc="batches", file=sys.stderr):
        chunk = records[start : start + args.batch_size]
        images = [[open_image(base / r["image"])] if r.get("image") else [] for r in chunk]
        texts, report = answer(
            model, processor, [r["prompt"] for r in chunk], images, args.max_new_tokens, args.temperature
        )
        for record, text in zip(chunk, texts):
            print(json.dumps({**record, "answer": text.strip()}), flush=True)
        tqdm.write(report, file=sys.stderr)
    return 0
