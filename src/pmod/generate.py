"""`pmod generate`: answer prompts about images with a p-MoD (or dense LLaVA) model folder.

One prompt streams its answer; ``--batch-file`` answers a JSONL file of ``{"image", "prompt"}`` records in batches
(left padding) and prints one JSON line per record. Either way the KV cache size is printed next to the size a
dense model would need for the same tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image, UnidentifiedImageError

import pmod
from pmod.cli import CLIError
from pmod.convert import MULTIMODAL_CLASSES
from pmod.data.tokenizer import VICUNA_SYSTEM


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a p-MoD or LLaVA model saved with save_pretrained")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    parser.add_argument("--prompt", help="the question")
    parser.add_argument("--batch-file", help='JSONL of {"image": PATH, "prompt": TEXT} records to answer in batches')
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def load_model(folder: str | Path, device: str = "auto") -> tuple[torch.nn.Module, Any]:
    """Load a p-MoD model (``pmod.load``) or a dense LLaVA model, and its processor, from a local folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{folder} has no config.json; pass a model folder written by save_pretrained.")
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [""])[0]
    if arch not in MULTIMODAL_CLASSES:
        raise CLIError(
            f"{folder} holds a {arch or 'model of unknown class'}, not a LLaVA or p-MoD LLaVA model; "
            f"pmod generate needs one of {', '.join(MULTIMODAL_CLASSES)}."
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if "pmod" in config:
        model = pmod.load(folder, dtype=dtype)
    else:
        model = getattr(transformers, arch).from_pretrained(folder, dtype=dtype)
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CLIError(f"{folder} has no usable processor ({err}); save the processor next to the model.") from err
    return model.to(device).eval(), processor


def build_prompt(processor: Any, prompt: str, n_images: int) -> str:
    """The model's chat template if the processor has one, otherwise the Vicuna v1 prompt used by LLaVA-1.5."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"{VICUNA_SYSTEM} USER: " + "<image>\n" * n_images + f"{prompt} ASSISTANT:"


def open_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise CLIError(f"image {path} does not exist; check the path.") from err
    except (UnidentifiedImageError, OSError) as err:
        raise CLIError(f"image {path} cannot be read as an image ({err}); pass a PNG or JPEG file.") from err


def encode(processor: Any, model: torch.nn.Module, prompts: list[str], images: list[list[Image.Image]]) -> dict:
    texts = [build_prompt(processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
    flat = [img for imgs in images for img in imgs]
    processor.tokenizer.padding_side = "left"  # generation appends on the right
    inputs = processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
    limit = model.config.get_text_config().max_position_embeddings
    if inputs["input_ids"].shape[1] >= limit:
        raise CLIError(
            f"the prompt is {inputs['input_ids'].shape[1]} tokens with its image(s), but the model's context is "
            f"{limit}; shorten the prompt or use fewer images."
        )
    return inputs.to(model.device)


def cache_report(cache: Any) -> str:
    """KV bytes of the cache next to what a dense model holds for the same tokens (every layer like layer 0)."""
    size = pmod.kv_cache_bytes(cache)
    dense = size.layer_bytes[0] * len(size.layer_bytes)  # layer 0 is always dense and caches every token
    mib, share = 2**20, size.total_bytes / dense
    return f"KV cache: {size.total_bytes / mib:.2f} MiB (dense model: {dense / mib:.2f} MiB, {share:.1%})"


def answer(model, processor, prompts, images, max_new_tokens, temperature, streamer=None) -> tuple[list[str], str]:
    inputs = encode(processor, model, prompts, images)
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
    cache = getattr(out, "cache", None)  # transformers >= 5.24; ``past_key_values`` before
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    return processor.batch_decode(new, skip_special_tokens=True), cache_report(cache)


def read_batch_file(path: str) -> list[dict[str, str]]:
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise CLIError(f"cannot read batch file {path} ({err}); pass a JSONL file.") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CLIError(f"{path} line {number} is not valid JSON ({err.msg}); fix or remove the line.") from err
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise CLIError(f'{path} line {number} needs a "prompt" string (and an optional "image" path).')
        records.append(record)
    return records


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.batch_file is None):
        raise CLIError("give either --prompt (with --image) or --batch-file, not both or neither.")
    if args.prompt is not None:
        images = [[open_image(p) for p in args.image]]  # bad input fails before the model loads
        model, processor = load_model(args.model, args.device)
        streamer = transformers.TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        _, report = answer(model, processor, [args.prompt], images, args.max_new_tokens, args.temperature, streamer)
        print(report, file=sys.stderr)
        return 0

    from tqdm import tqdm

    records = read_batch_file(args.batch_file)
    base = Path(args.batch_file).parent
    model, processor = load_model(args.model, args.device)
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
