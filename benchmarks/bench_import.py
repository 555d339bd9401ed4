"""Peak memory of ``pmod import-llava`` on a random-weight checkpoint in the original p-MoD format (target: at most
1.3x the model's size; the import streams, so it should stay far below).

The source (a p-MoD-LLaVA-v1.5-shaped checkpoint: Llama decoder, 2-layer projector, CLIP-L/14-336 tower in the
checkpoint, routers on the layers the original schedule routes, safetensors or ``.bin`` shards, a 32000-word
tokenizer) is written tensor by tensor, then imported in a fresh interpreter whose peak RSS is
read by it when it is done (VmHWM). A second interpreter that only imports what the import imports gives the baseline.

    python benchmarks/bench_import.py --out benchmarks/results/import_peak_memory.json          # 7B shape, fp16
    python benchmarks/bench_import.py --quick                                                   # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

#: LLaVA-1.5-7B (Vicuna-7B): 32 layers, d=4096, 32 heads, SwiGLU 11008, 32000 tokens.
FULL = dict(layers=32, hidden=4096, heads=32, intermediate=11008, vocab=32000)
QUICK = dict(layers=12, hidden=256, heads=4, intermediate=688, vocab=32000)
TOWER = dict(hidden=1024, intermediate=4096, layers=24, image=336, patch=14)  # openai/clip-vit-large-patch14-336
TARGET = 1.3
IMPORT = "from pmod.io.importers.original_llava import import_llava"


def original_tensors(shape: dict, ratios: list[float | None]) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of an original-format p-MoD-LLaVA checkpoint, in the order it saves them."""
    d, f, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    names = [("model.embed_tokens.weight", (v, d))]
    for i, ratio in enumerate(ratios):
        layer = f"model.layers.{i}." + ("decoder_layer." if ratio is not None else "")
        names += [(layer + f"self_attn.{p}_proj.weight", (d, d)) for p in "qkvo"]
        names += [(layer + "mlp.gate_proj.weight", (f, d)), (layer + "mlp.up_proj.weight", (f, d))]
        names += [(layer + "mlp.down_proj.weight", (d, f)), (layer + "input_layernorm.weight", (d,))]
        names += [(layer + "post_attention_layernorm.weight", (d,))]
        if ratio is not None:
            names += [
                (f"model.layers.{i}.router.router.weight", (1, d)),
                (f"model.layers.{i}.router.router.bias", (1,)),
            ]
    names += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    t = TOWER
    names += [
        ("model.mm_projector.0.weight", (d, t["hidden"])),
        ("model.mm_projector.0.bias", (d,)),
        ("model.mm_projector.2.weight", (d, d)),
        ("model.mm_projector.2.bias", (d,)),
    ]
    tower, h = "model.vision_tower.vision_tower.vision_model.", t["hidden"]
    positions = (t["image"] // t["patch"]) ** 2 + 1
    names += [
        (tower + "embeddings.class_embedding", (h,)),
        (tower + "embeddings.patch_embedding.weight", (h, 3, t["patch"], t["patch"])),
        (tower + "embeddings.position_embedding.weight", (positions, h)),
        (tower + "pre_layrnorm.weight", (h,)),
        (tower + "pre_layrnorm.bias", (h,)),
    ]
    for i in range(t["layers"]):
        layer = f"{tower}encoder.layers.{i}."
        for p in ("q", "k", "v", "out"):
            names += [(layer + f"self_attn.{p}_proj.weight", (h, h)), (layer + f"self_attn.{p}_proj.bias", (h,))]
        names += [(layer + "mlp.fc1.weight", (t["intermediate"], h)), (layer + "mlp.fc1.bias", (t["intermediate"],))]
        names += [(layer + "mlp.fc2.weight", (h, t["intermediate"])), (layer + "mlp.fc2.bias", (h,))]
        names += [(layer + f"layer_norm{n}.{w}", (h,)) for n in (1, 2) for w in ("weight", "bias")]
    names += [(tower + "post_layernorm.weight", (h,)), (tower + "post_layernorm.bias", (h,))]
    return names


def write_source(folder: Path, shape: dict, dtype: torch.dtype, fmt: str, shard_bytes: int, seed: int) -> int:
    """Write the checkpoint (config, weights, tokenizer); returns its weight bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pmod.io.importers.original_config import original_ratios
    from pmod.io.importers.tensor_files import OutputTensor, write_shards

    folder.mkdir(parents=True)
    ratios = original_ratios("shiftedcos_decay_0.85_0.15", 0.5, shape["layers"])
    specs = original_tensors(shape, ratios)
    gen = torch.Generator().manual_seed(seed)

    def random(dims: tuple) -> torch.Tensor:
        return (torch.randn(dims, generator=gen) * 0.02).to(dtype)

    if fmt == "safetensors":
        write_shards(folder, [OutputTensor(n, s, dtype, lambda s=s: random(s)) for n, s in specs], shard_bytes)
    else:  # pytorch_model-0000i-of-0000n.bin, as the LLaVA code base saved LLaVA-1.5 (each shard held in memory here)
        groups, size = [[]], 0
        for name, dims in specs:
            nbytes = math.prod(dims) * dtype.itemsize
            if groups[-1] and size + nbytes > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, dims))
            size += nbytes
        weight_map = {}
        for i, group in enumerate(groups):
            file = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
            torch.save({name: random(dims) for name, dims in group}, folder / file)
            weight_map |= {name: file for name, _ in group}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shape["vocab"])}}
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    config = {
        "model_type": "pmod_llava_llama",
        "architectures": ["PmodLlavaLlamaForCausalLM"],
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["heads"],
        "vocab_size": shape["vocab"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": TOWER["hidden"],
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mod_target_layers": "shiftedcos_decay_0.85_0.15",
        "mod_router_factor": 0.5,
        "mod_weight_norm": "tanh_0.2_1",
        "mod_bias_enabled": True,
        "mod_target_token_type": "vision_all",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sum(math.prod(dims) for _, dims in specs) * dtype.itemsize


def child_peak(code: str) -> tuple[int, float]:
    """Peak RSS (bytes) and wall seconds of a fresh interpreter running ``code``.

    The peak is the child's VmHWM, read by the child itself: its own address space's high-water mark. (Its
    ``ru_maxrss`` would not do: Linux carries the forking parent's resident size across ``exec`` into it.)
    """
    report = (
        "\nfrom pathlib import Path\n"
        "print(next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')))"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code + report],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    seconds = time.perf_counter() - start
    kib = next(int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024, seconds


def same_tensor(src: Path, dst: Path, source_name: str, target_name: str) -> bool:
    """A spot check that the import moved the bytes: one tensor of the source equals its imported copy."""
    from pmod.io.importers.tensor_files import TensorFolder

    return torch.equal(
        TensorFolder.of_folder(src, "source").read(source_name), TensorFolder.of_folder(dst, "import").read(target_name)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 12-layer d=256 model (with the full CLIP tower)")
    for key, value in FULL.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    parser.add_argument("--source-shard-gb", type=float, default=4.0, help="source shard size (GB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write source and import (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shape = {k: getattr(args, k) or (QUICK if args.quick else FULL)[k] for k in FULL}
    dtype = getattr(torch, args.dtype)
    work = Path(tempfile.mkdtemp(prefix="bench_import_", dir=args.workdir))
    try:
        start = time.perf_counter()
        model_bytes = write_source(work / "src", shape, dtype, args.format, int(args.source_shard_gb * 1e9), seed=0)
        write_s = time.perf_counter() - start
        baseline, _ = child_peak(f"{IMPORT}; import transformers, torch; transformers.LlavaForConditionalGeneration")
        peak, import_s = child_peak(f"{IMPORT}; import_llava({str(work / 'src')!r}, {str(work / 'dst')!r})")
        out_bytes = sum(p.stat().st_size for p in (work / "dst").glob("*.safetensors"))
        last = shape["layers"] - 1  # a routed layer: its weights are under decoder_layer in the source
        unchanged = same_tensor(
            work / "src",
            work / "dst",
            f"model.layers.{last}.decoder_layer.mlp.down_proj.weight",
            f"model.language_model.layers.{last}.mlp.down_proj.weight",
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    ratio = peak / model_bytes
    result = {
        "benchmark": "bench_import",
        "command": "python benchmarks/bench_import.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "model": {
            **shape,
            "tower": "CLIP-L/14-336 (in the checkpoint)",
            "dtype": args.dtype,
            "format": args.format,
            "bytes": model_bytes,
            "gib": model_bytes / 2**30,
        },
        "written_bytes": out_bytes,
        "spot_check_unchanged": unchanged,
        "source_write_s": write_s,
        "import_s": import_s,
        "import_gib_per_s": model_bytes / 2**30 / import_s,
        "baseline_peak_rss_bytes": baseline,
        "import_peak_rss_bytes": peak,
        "import_peak_rss_gib": peak / 2**30,
        "peak_rss_above_baseline_bytes": peak - baseline,
        "peak_rss_to_model_size": ratio,
        "target": f"peak RSS <= {TARGET} x model size",
        "target_met": ratio <= TARGET,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
