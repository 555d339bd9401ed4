"""Commands that load a model folder, on the cases where they used to disagree: a training-free method applied on
the fly (``--method fastv``), list flags written as ranges, the prompt length ``pmod flops`` counts, a folder whose
settings route no layer, and a truncated weights file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pmod
from pmod.analysis import plots
from pmod.analysis.analytic_flops import estimate
from pmod.cli import main
from pmod.core.cache import kv_cache_bytes
from pmod.core.errors import UserError
from pmod.data import synth
from pmod.data.tokenizer import VICUNA_SYSTEM
from pmod.io.model_folder import check_model_folder
from pmod.recipes.viz import image_routing
from pmod.testing import tiny_llava_folder

PROMPT = "What color is the shape ?"
QUESTION = "What is shown in this image?"  # the one-line question whose prompt pmod flops counts
ALL_DENSE = pmod.PModConfig(schedule="explicit", ratios=[None] * 6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    dense = Path(tiny_llava_folder(str(root / "dense"), num_layers=6))
    routed = Path(tiny_llava_folder(str(root / "routed"), num_layers=6, method_config=pmod.PModConfig()))
    all_dense = Path(tiny_llava_folder(str(root / "all-dense"), num_layers=6, method_config=ALL_DENSE))
    truncated = root / "truncated"
    shutil.copytree(routed, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:  # a copy cut short
        f.truncate(f.seek(0, 2) // 2)
    image = Image.new("RGB", (32, 32), (200, 200, 200))
    image.paste((230, 25, 25), (0, 0, 8, 8))
    image.save(root / "red.png")
    data, _ = synth.generate(root / "data", 4, seed=0, image_size=32)
    return {"root": root, "dense": dense, "routed": routed, "all_dense": all_dense, "truncated": truncated,
            "red": root / "red.png", "data": data}  # fmt: skip


def reference_generate(folder: Path, config, image: Path, max_new_tokens: int = 6) -> tuple[str, str]:
    """Greedy answer and KV share without the CLI: transformers' own class, pmod.convert, the Vicuna v1 prompt."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    if config is not None:
        pmod.convert(model, config)
    processor = AutoProcessor.from_pretrained(folder)
    text = f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:"
    inputs = processor(text=[text], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=processor.tokenizer.pad_token_id)  # fmt: skip
    answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    size = kv_cache_bytes(out.past_key_values)
    return answer.strip(), f"{size.total_bytes / (size.layer_bytes[0] * len(size.layer_bytes)):.1%}"


def generate_on_the_fly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], num_layers: int, config, flags: list[str]
) -> tuple[str, str]:
    """`pmod generate` with a training-free method given as ``flags`` on a fresh tiny dense folder
    (``tmp_path / "dense"``) and a red image (``tmp_path / "red.png"``): it exits 0 and answers what
    :func:`reference_generate` answers with ``config``. Returns its stderr and the reference's KV share."""
    folder = tiny_llava_folder(str(tmp_path / "dense"), num_layers=num_layers)
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (230, 25, 25)).save(image)
    rc = main(["generate", "--model", folder, "--image", str(image), "--prompt", PROMPT, "--max-new-tokens", "6",
               *flags])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    answer, share = reference_generate(Path(folder), config, image)
    assert captured.out.strip() == answer
    return captured.err, share


def last_error(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


# ------------------------------------------------------------------------------------ --method on a dense folder
def test_generate_fastv_on_a_dense_folder_equals_convert(world, capsys) -> None:
    fastv = pmod.FastVConfig(layer=2, keep=0.25)
    rc = main(["generate", "--model", str(world["dense"]), "--image", str(world["red"]), "--prompt", PROMPT,
               "--max-new-tokens", "6", "--method", "fastv", "--fastv-layer", "2", "--fastv-keep", "0.25"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    answer, share = reference_generate(world["dense"], fastv, world["red"])
    assert captured.out.strip() == answer
    assert f", {share})" in captured.err
    assert reference_generate(world["dense"], None, world["red"])[1] == "100.0%"  # FastV's cache is smaller


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "{routed}", "--method", "fastv"], ["already a pmod model", "drop --method"]),
        (["--model", "{dense}", "--method", "pmod"], ["--method pmod", "trained first", "fastv"]),
        (["--model", "{dense}", "--fastv-keep", "0.3"], ["--fastv-keep", "pass --method fastv"]),
        (["--model", "{dense}", "--method", "fastv", "--fastv-keep", "2"], ["keep 2.0 is outside (0, 1]"]),
    ],
)
def test_method_mistakes_get_one_line(world, capsys, argv, words) -> None:
    argv = [a.format(**{k: str(v) for k, v in world.items()}) for a in argv]
    rc = main(["generate", *argv, "--image", str(world["red"]), "--prompt", PROMPT])
    err = last_error(capsys)
    assert rc == 2 and err.startswith("pmod generate: error: ") and all(w in err for w in words), err


def test_viz_fastv_on_a_dense_folder_draws_what_convert_keeps(world, tmp_path, capsys) -> None:
    rc = main(["viz", "--model", str(world["dense"]), "--image", str(world["red"]), "--prompt", PROMPT, "--out",
               str(tmp_path / "plots"), "--method", "fastv", "--fastv-layer", "4", "--fastv-keep", "0.3"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = pmod.convert(LlavaForConditionalGeneration.from_pretrained(world["dense"]).eval(),
                         pmod.FastVConfig(layer=4, keep=0.3))  # fmt: skip
    routing = image_routing(model, AutoProcessor.from_pretrained(world["dense"]), Image.open(world["red"]), PROMPT)
    assert dict(zip(routing.layers, routing.kept.sum(1).tolist())) == {4: 5, 5: 5}  # round(16 * 0.3)
    want = np.asarray(Image.open(plots.plot_token_heatmap(routing, tmp_path / "want.png")))
    assert np.array_equal(want, np.asarray(Image.open(tmp_path / "plots" / "token_heatmap.png")))


def test_flops_fastv_on_a_dense_folder(world, capsys) -> None:
    rc = main(["flops", str(world["dense"]), "--method", "fastv", "--fastv-keep", "0.25", "--text-tokens", "20",
               "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    from transformers import AutoConfig

    want = estimate(AutoConfig.from_pretrained(world["dense"]), pmod.FastVConfig(keep=0.25), n_vision=16, n_text=20,
                    dtype="float32")  # fmt: skip
    assert rc == 0 and data["method"] == "fastv"
    assert [layer["processed"] for layer in data["layers"]] == [36, 36] + [20 + 4] * 4
    assert data["pmod_tflops"] == pytest.approx(want.routed_flops / 1e12, rel=1e-12)


# ------------------------------------------------------------------------------------------------ ranges in lists
@pytest.mark.parametrize(
    ("text", "layers"), [("2-26", list(range(2, 27))), ("1,3-5", [1, 3, 4, 5]), ("4 - 6, 8", [4, 5, 6, 8])]
)
def test_list_flags_take_ranges(capsys, text, layers) -> None:
    rc = main(["flops", "--preset", "llava-1.5-7b", "--method", "gamma_mod", "--gamma-mod-layers", text, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [i for i, r in enumerate(data["schedule"]) if r is not None] == layers
    from pmod.core.config import parse_field

    assert parse_field(pmod.PModConfig, "layers", text) == layers
    assert parse_field(pmod.MoDConfig, "layers", text) == layers


@pytest.mark.parametrize(
    ("text", "words"),
    [("2-", "cannot read '2-'; write a number or a range a-b such as 2-26"),
     ("26-2", "the range 26-2 runs backwards; write 2-26"),
     ("1,3-x", "cannot read '3-x'; write a number or a range a-b such as 2-26")],
)  # fmt: skip
def test_malformed_range_is_one_line(capsys, text, words) -> None:
    rc = main(["flops", "--preset", "llava-1.5-7b", "--method", "gamma_mod", "--gamma-mod-layers", text])
    err = last_error(capsys)
    assert rc == 2 and err == f"pmod flops: error: --gamma-mod-layers: layers: {words}", err


# ------------------------------------------------------------------------------------- pmod flops' prompt length
def prompt_tokens(folder: Path, text: str) -> int:
    """Text tokens of ``text`` with one image, as the model's own processor makes them (the image expanded)."""
    from transformers import AutoConfig, AutoProcessor

    ids = AutoProcessor.from_pretrained(folder)(text=[text], images=[Image.new("RGB", (32, 32))])["input_ids"][0]
    return sum(1 for i in ids if i != AutoConfig.from_pretrained(folder).image_token_id)


def test_flops_counts_the_models_own_prompt(world, tmp_path, capsys) -> None:
    rc = main(["flops", str(world["dense"]), "--json"])
    assert rc == 0
    want = prompt_tokens(world["dense"], f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:")
    assert json.loads(capsys.readouterr().out)["n_text"] == want != 64
    template = ("{% for m in messages %}<s> USER : {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT :")  # fmt: skip
    folder = Path(tiny_llava_folder(str(tmp_path / "templated"), num_layers=2, chat_template=template))
    assert main(["flops", str(folder), "--json"]) == 0
    want = prompt_tokens(folder, f"<s> USER : <image>{QUESTION} ASSISTANT :")
    assert json.loads(capsys.readouterr().out)["n_text"] == want
    assert main(["flops", str(folder), "--json", "--text-tokens", "7"]) == 0  # the flag still decides
    assert json.loads(capsys.readouterr().out)["n_text"] == 7


# ------------------------------------------------------------------------------------------- pmod arank's outputs
def test_arank_writes_files_only_where_asked(tmp_path, capsys, monkeypatch) -> None:
    folder = tiny_llava_folder(str(tmp_path / "model"), num_layers=2)
    data, _ = synth.generate(tmp_path / "data", 2, seed=0, image_size=32)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    assert main(["arank", "--model", folder, "--data", str(data), "--samples", "1"]) == 2  # 4th of 2 layers
    assert last_error(capsys) == ("pmod arank: error: --threshold-rank is 4 but the model has 2 layers; give at "
                                  "most 2 (the paper: 4)")  # fmt: skip
    assert main(["arank", "--model", folder, "--data", str(data), "--samples", "1", "--threshold-rank", "2"]) == 0
    assert list(run.iterdir()) == []
    assert main(["arank", "--model", folder, "--data", str(data), "--samples", "1", "--threshold-rank", "2",
                 "--plot", "p/a.png"]) == 0  # fmt: skip
    assert [p.relative_to(run).as_posix() for p in run.rglob("*")] == ["p", "p/a.png"]
    for flag in ("--plot", "--out"):
        assert main(["arank", "--model", folder, "--data", str(data), "--threshold-rank", "2", flag,
                     str(run / "p")]) == 2  # fmt: skip
        want = f"pmod arank: error: {flag} {run / 'p'} is an existing folder, not a file; pass a file path."
        assert last_error(capsys) == want


# ------------------------------------------------------------------------------- settings that route no layer
def test_settings_that_route_no_layer_run_dense_everywhere(world, tmp_path, capsys, caplog) -> None:
    folder = world["all_dense"]
    with caplog.at_level(logging.WARNING, logger="pmod.core.convert"):
        rc = main(["generate", "--model", str(folder), "--image", str(world["red"]), "--prompt", PROMPT,
                   "--max-new-tokens", "6"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    answer, _ = reference_generate(folder, None, world["red"])  # transformers' own class: the dense model
    assert captured.out.strip() == answer and captured.err.strip().endswith(", 100.0%)")
    # pmod's own warning, once (transformers may log its own once-per-process deprecations beside it)
    assert [r.getMessage() for r in caplog.records if r.name == "pmod.core.convert"] == [
        f"no layer of this model is routed ({folder}: its pmod settings leave every layer dense); it runs as the "
        f"dense model."
    ]
    rc = main(["viz", "--model", str(folder), "--image", str(world["red"]), "--prompt", PROMPT, "--out",
               str(tmp_path / "plots")])  # fmt: skip
    assert rc == 2 and "no layer of" in last_error(capsys) and not (tmp_path / "plots").exists()
    assert main(["flops", str(folder), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["pmod_tflops"] == json.loads(captured.out)["dense_tflops"]
    assert captured.err.strip().splitlines()[-1].startswith("pmod flops: warning: no layer is routed")


def test_train_keeps_settings_that_route_no_layer(world, tmp_path) -> None:
    rc = main(["train", "--model", str(world["all_dense"]), "--data-path", str(world["data"]), "--output-dir",
               str(tmp_path / "out"), "--max-steps", "1", "--use-cpu", "--report-to", "none",
               "--per-device-train-batch-size", "2", "--save-strategy", "no"])  # fmt: skip
    assert rc == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["pmod_method"] == ALL_DENSE.stored()
    assert pmod.layer_ratios(pmod.load(tmp_path / "out")) == [None] * 6


# ------------------------------------------------------------------------------------------ a truncated weights file
def test_truncated_weights_are_named_in_every_command(world, tmp_path, capsys) -> None:
    folder = world["truncated"]
    size = (folder / "model.safetensors").stat().st_size
    words = f"{folder}/model.safetensors is truncated or corrupt (its header describes "
    ending = f" bytes, the file has {size}); re-save or re-download it."
    image, out = str(world["red"]), str(tmp_path / "out")
    commands = {
        "generate": ["--model", str(folder), "--image", image, "--prompt", PROMPT],
        "viz": ["--model", str(folder), "--image", image, "--prompt", PROMPT, "--out", out],
        "flops": [str(folder)],
        "train": ["--model", str(folder), "--data-path", str(world["data"]), "--output-dir", str(tmp_path / "t"),
                  "--use-cpu", "--report-to", "none"],
    }
    for command, argv in commands.items():
        assert main([command, *argv]) == 2, command
        err = last_error(capsys)
        assert err.startswith(f"pmod {command}: error: {words}") and err.endswith(ending), err
    for load in (pmod.load, check_model_folder):
        with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
            load(folder)
    assert not Path(out).exists()


def test_the_command_line_says_so_in_one_line(world) -> None:
    """Outside pytest's log capture: `pmod generate` prints the warning once, as one line, and answers."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pmod.cli", "generate", "--model", str(world["all_dense"]), "--image",
                           str(world["red"]), "--prompt", PROMPT, "--max-new-tokens", "2"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "routed" in line]
    assert lines == [f"no layer of this model is routed ({world['all_dense']}: its pmod settings leave every layer "
                     f"dense); it runs as the dense model."]  # fmt: skip


def test_method_settings_read_alike_from_flags_recipes_and_model_args() -> None:
    """``<method>_<field>`` settings are read one way: a flag's text, a YAML recipe's value and an lmms-eval model arg
    give the same config, and the same mistake the same reason, each named the way its user wrote it."""
    from pmod.eval.model_args import method_from_args
    from pmod.recipes.method_flags import config_from_values

    want = pmod.PModConfig(schedule="constant", ratio=0.25, layers=[1, 3, 4, 5])
    assert config_from_values({"pmod_schedule": "constant", "pmod_ratio": "0.25", "pmod_layers": "1,3-5"}, "pmod") \
        == want  # fmt: skip
    assert config_from_values({"pmod_schedule": "constant", "pmod_ratio": 0.25, "pmod_layers": [1, 3, 4, 5]}, "pmod") \
        == want  # a YAML recipe's values  # fmt: skip
    assert method_from_args("pmod", {"pmod_schedule": "constant", "pmod_ratio": "0.25", "pmod_layers": "'[1,3-5]'"}) \
        == want  # fmt: skip
    why = "layers: cannot read 'x-3'; write a number or a range a-b such as 2-26"
    with pytest.raises(UserError) as flag_error:
        config_from_values({"pmod_layers": "1,x-3"}, "pmod")
    assert str(flag_error.value) == f"--pmod-layers: {why}"
    with pytest.raises(UserError) as arg_error:
        method_from_args("pmod", {"pmod_layers": "1,x-3"})
    assert str(arg_error.value) == f"model arg pmod_layers: {why}"
    refused = "fastv settings: FastV keep 1.5 is outside (0, 1]; choose the share of vision tokens to keep."
    for read in (lambda: config_from_values({"fastv_keep": "1.5"}, "fastv"),
                 lambda: method_from_args("fastv", {"fastv_keep": "1.5"})):  # fmt: skip
        with pytest.raises(UserError) as refusal:
            read()
        assert str(refusal.value) == refused
