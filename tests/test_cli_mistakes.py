"""Plausible mistakes, each run through the real ``pmod`` command in its own subprocess (side by side): exit code
2, one error line on stderr that names the problem and the fix (after at most one usage line, for a flag error), no
traceback, and nothing written to the output folder. Also: the README quickstart's folder works with ``pmod
generate``, and ``--help`` / flag errors do not load torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import pmod
from pmod.data import synth
from pmod.testing import tiny_llama, tiny_llava, tiny_llava_folder

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def pmod_command(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmod.cli", *argv], capture_output=True, text=True, env=ENV,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistakes")
    routed = Path(tiny_llava_folder(str(root / "routed"), num_layers=4, method_config=pmod.PModConfig()))
    dense = Path(tiny_llava_folder(str(root / "dense"), num_layers=4))
    tiny_llama(num_layers=2).save_pretrained(root / "llama")
    no_processor = root / "no-processor"  # the README quickstart before it saved the processor
    tiny_llava(num_layers=2).save_pretrained(no_processor)
    train_json, _ = synth.generate(root / "data", 12, seed=0, image_size=32)
    broken = root / "data" / "broken.json"  # beside train.json: the other records' images resolve
    records = json.loads(train_json.read_text())
    broken.write_text(json.dumps([{**records[0], "image": "images/missing.png"}, *records[1:]]))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "red.png")
    (root / "bad.png").write_text("not a png")
    checkpoint = root / "resume" / "checkpoint-1"  # a run of another method, to resume with the default p-MoD
    shutil.copytree(routed, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    config["pmod_method"] = pmod.MoDConfig().stored()
    (checkpoint / "config.json").write_text(json.dumps(config))
    (checkpoint / "trainer_state.json").write_text("{}")  # the rest of a resumable checkpoint
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, checkpoint / name)
    truncated = root / "truncated"  # a copy cut short
    shutil.copytree(routed, truncated)
    (truncated / "model.safetensors").write_bytes((routed / "model.safetensors").read_bytes()[:30000])
    all_dense = tiny_llava_folder(str(root / "all-dense"), num_layers=4,
                                  method_config=pmod.PModConfig(schedule="explicit", ratios=[None] * 4))  # fmt: skip
    return {"root": root, "routed": routed, "dense": dense, "llama": root / "llama", "no_processor": no_processor,
            "data": train_json, "broken": broken, "red": root / "red.png", "bad": root / "bad.png",
            "resume": root / "resume", "truncated": truncated, "all_dense": Path(all_dense)}  # fmt: skip


def train_flags(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(world["routed"]), "--data-path", str(world["data"]), "--output-dir", str(out),
            "--max-steps", "1", "--use-cpu", "--report-to", "none", "--per-device-train-batch-size", "2",
            *extra]  # fmt: skip


#: (case, argv builder, words the error line must contain).
MISTAKES = [
    ("train a Llama-only model", lambda w, o: ["train", "--model", str(w["llama"]), "--data-path", str(w["data"]),
                                               "--output-dir", str(o)], ["not a LLaVA model", "pmod train"]),
    ("resume with other method flags", lambda w, o: [*train_flags(w, w["resume"]), "--resume-from-checkpoint", "auto"],
     ["holds a mod model", "same --method"]),
    ("--on-bad-sample error", lambda w, o: [*train_flags(w, o, "--on-bad-sample", "error"), "--data-path",
                                           str(w["broken"])], ["bad sample", "--on-bad-sample skip"]),
    ("wrong --image-folder", lambda w, o: [*train_flags(w, o), "--image-folder", str(w["root"] / "nowhere")],
     ["none of the first", "--image-folder"]),
    ("train --data (not a flag)", lambda w, o: ["train", "--model", "m", "--data", "x"], ["--data", "did you mean"]),
    ("train FastV", lambda w, o: ["train", "--model", "m", "--method", "fastv"], ["training-free"]),
    ("train a stray method flag", lambda w, o: ["train", "--model", "m", "--mod-ratio", "0.3"], ["--method mod"]),
    ("train a bad Trainer value", lambda w, o: ["train", "--model", "m", "--learning-rate", "fast"],
     ["--learning-rate", "number"]),
    ("generate without --image", lambda w, o: ["generate", "--model", str(w["routed"]), "--prompt", "what ?"],
     ["--image", "--text-only"]),
    ("generate without a processor", lambda w, o: ["generate", "--model", str(w["no_processor"]), "--image",
                                                   str(w["red"]), "--prompt", "what ?"], ["processor", "save"]),
    ("generate a Llama-only model", lambda w, o: ["generate", "--model", str(w["llama"]), "--image", str(w["red"]),
                                                  "--prompt", "what ?"], ["not a LLaVA model", "pmod generate"]),
    ("generate an unreadable image", lambda w, o: ["generate", "--model", str(w["routed"]), "--image", str(w["bad"]),
                                                   "--prompt", "what ?"], ["cannot be read", "PNG or JPEG"]),
    ("viz a Llama-only model", lambda w, o: ["viz", "--model", str(w["llama"]), "--image", str(w["red"]), "--prompt",
                                             "what ?", "--out", str(o)], ["not a LLaVA model", "pmod viz"]),
    ("viz a dense model", lambda w, o: ["viz", "--model", str(w["dense"]), "--image", str(w["red"]), "--prompt",
                                        "what ?", "--out", str(o)], ["dense model", "pmod.convert"]),
    ("flops with a mistyped flag", lambda w, o: ["flops", "--preset", "llava-1.5-7b", "--vision-tokns", "3"],
     ["--vision-tokns", "did you mean --vision-tokens"]),
    ("flops an unknown preset", lambda w, o: ["flops", "--preset", "llava-99b"], ["llava-99b", "choose one of"]),
    ("arank a converted model", lambda w, o: ["arank", "--model", str(w["routed"]), "--data", str(w["data"]),
                                              "--plot", str(o / "a.png")], ["already converted", "dense model"]),
    ("a mistyped command", lambda w, o: ["trian"], ["did you mean `pmod train`"]),
    ("import a folder that is not there", lambda w, o: ["import-llava", str(w["root"] / "nowhere"), "--out", str(o)],
     ["nowhere"]),
    ("import a Hugging Face folder", lambda w, o: ["import-llava", str(w["routed"]), "--out", str(o)],
     ["llava_llama"]),
    ("ablate an unknown variant", lambda w, o: ["ablate", "--variants", "pmod,foo", "--out", str(o)],
     ["foo", "choose from", "dense"]),
    ("ablate resume where no run is", lambda w, o: ["ablate", "--resume", str(w["root"] / "nowhere")],
     ["no pmod ablate run there", "pmod ablate --out"]),
    ("ablate zero seeds", lambda w, o: ["ablate", "--seeds", "0", "--out", str(o)], ["--seeds", "at least 1"]),
    ("eval a folder without a model", lambda w, o: ["eval", "--model", str(w["root"] / "nowhere"), "--tasks",
                                                    "pmod_shapes", "--out", str(o)], ["no config.json"]),
    ("generate a truncated model", lambda w, o: ["generate", "--model", str(w["truncated"]), "--image", str(w["red"]),
                                                 "--prompt", "what ?"], ["model.safetensors is truncated or corrupt",
                                                                         "re-download"]),
    ("train a truncated model", lambda w, o: train_flags(w, o, "--model", str(w["truncated"])),
     ["model.safetensors is truncated or corrupt", "re-download"]),
    ("viz into an existing file", lambda w, o: ["viz", "--model", str(w["routed"]), "--image", str(w["red"]),
                                                "--prompt", "what ?", "--out", str(w["red"])],
     ["--out", "is an existing file"]),
    ("viz settings that route no layer", lambda w, o: ["viz", "--model", str(w["all_dense"]), "--image",
                                                       str(w["red"]), "--prompt", "what ?", "--out", str(o)],
     ["no layer of", "is routed", "every layer dense"]),
    ("arank a plot into a folder", lambda w, o: ["arank", "--model", str(w["dense"]), "--data", str(w["data"]),
                                                 "--plot", str(w["root"])], ["--plot", "existing folder"]),
    ("generate FastV on a routed folder", lambda w, o: ["generate", "--model", str(w["routed"]), "--image",
                                                        str(w["red"]), "--prompt", "what ?", "--method", "fastv"],
     ["already a pmod model", "drop --method"]),
    ("import into an existing file", lambda w, o: ["import-llava", str(w["routed"]), "--out", str(w["red"])],
     ["is an existing file"]),
]  # fmt: skip


def world_files(world: dict[str, Path]) -> list[Path]:
    return sorted(p.relative_to(world["root"]) for p in world["root"].rglob("*"))


@pytest.fixture(scope="module")
def mistakes(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every MISTAKES command, each in its own subprocess, run side by side (as many at once as there are cores:
    most of each run is starting Python and importing torch): case -> its process and its output folder, and the
    world's files before and after them all."""
    root = tmp_path_factory.mktemp("outs")
    outs = {case: root / str(i) / "out" for i, (case, _, _) in enumerate(MISTAKES)}
    for out in outs.values():
        out.parent.mkdir()
    before = world_files(world)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        procs = pool.map(lambda mistake: pmod_command(*mistake[1](world, outs[mistake[0]])), MISTAKES)
        runs = {case: (proc, outs[case]) for (case, _, _), proc in zip(MISTAKES, procs, strict=True)}
    return {"runs": runs, "before": before, "after": world_files(world)}


@pytest.mark.parametrize(("case", "words"), [(m[0], m[2]) for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_mistake_gets_one_line(mistakes: dict[str, Any], case: str, words: list[str]) -> None:
    proc, out = mistakes["runs"][case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage: ")), lines
    assert all(word in errors[0] for word in words), errors[0]
    assert not out.exists()  # nothing written
    assert mistakes["after"] == mistakes["before"]  # by any of the mistakes


def test_readme_quickstart_folder_works_with_generate(tmp_path: Path) -> None:
    """Convert, save the model and the processor as the README says: `pmod generate` and `pmod.load` accept it."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    source = tiny_llava_folder(str(tmp_path / "source"), num_layers=4)
    model = LlavaForConditionalGeneration.from_pretrained(source)
    processor = AutoProcessor.from_pretrained(source)
    model = pmod.convert(model)
    model.save_pretrained(tmp_path / "my-pmod-model")
    processor.save_pretrained(tmp_path / "my-pmod-model")
    assert pmod.is_routed_model(pmod.load(tmp_path / "my-pmod-model"))
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "blue.png")
    proc = pmod_command("generate", "--model", str(tmp_path / "my-pmod-model"), "--image", str(tmp_path / "blue.png"),
                        "--prompt", "What color is the shape ?", "--max-new-tokens", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "KV cache:" in proc.stderr


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["generate", "--help"], ["flops", "--help"], ["viz", "--help"],
     ["demo", "--help"], ["arank", "--help"], ["data", "--help"], ["import-llava", "--help"], ["ablate", "--help"],
     ["eval", "--help"], ["ablate", "--variants", "foo"],
     ["train", "--model", "m", "--data_path", "x", "--bogus"], ["generate", "--model"]],
)  # fmt: skip
def test_help_and_flag_errors_load_no_torch(argv: list[str]) -> None:
    """Parse first: --help and flag errors answer without importing torch or transformers (hence at once)."""
    code = (
        "import sys\nfrom pmod.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    rc = e.code\nheavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy, rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY [] "), (last, proc.stderr[-500:])
    assert last.endswith(" 0") == ("--help" in argv), last


@pytest.mark.parametrize(
    ("case", "argv", "words"),
    [("no source", lambda w: [str(w["root"] / "nowhere"), "--out", str(w["root"] / "new")], "has no config.json"),
     ("a Hugging Face folder", lambda w: [str(w["routed"]), "--out", str(w["root"] / "new")], "model_type='llava'"),
     ("--out is a file", lambda w: [str(w["routed"]), "--out", str(w["red"])], "is an existing file"),
     ("--out is not empty", lambda w: [str(w["routed"]), "--out", str(w["dense"])], "already exists and is not empty"),
     ("--vision-tower without a config", lambda w: [str(w["root"] / "original"), "--out", str(w["root"] / "new"),
                                                     "--vision-tower", str(w["root"])],
      "has no config.json; pass a local CLIP folder")],
    ids=lambda v: v if isinstance(v, str) else "",
)  # fmt: skip
def test_import_llava_mistakes_load_no_torch(world: dict[str, Path], case: str, argv, words: str) -> None:
    """import-llava's mistakes answer before torch and transformers load, like every other command's."""
    original = world["root"] / "original"  # the config of an original LLaVA-1.5 checkpoint, nothing else
    original.mkdir(exist_ok=True)
    (original / "config.json").write_text(json.dumps({
        "model_type": "llava_llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 128, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
    }))  # fmt: skip
    code = (
        "import sys\nfrom pmod.cli import main\nrc = main(sys.argv[1:])\n"
        "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, "import-llava", *argv(world)], capture_output=True, text=True,
                          env=ENV, timeout=60)  # fmt: skip
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY [] 2", proc.stderr[-500:]
    assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    assert not (world["root"] / "new").exists()
