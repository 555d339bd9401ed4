"""`pmod generate` end to end on a tiny p-MoD LLaVA folder with a word-level processor."""

import json

import pytest
import torch
from PIL import Image

import pmod
from pmod.cli import main
from pmod.data.tokenizer import VICUNA_SYSTEM
from pmod.testing import tiny_llama, tiny_llava_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_llava_folder(str(path), num_layers=6, method_config=pmod.PModConfig())
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path / "red.png")
    Image.new("RGB", (30, 50), (10, 10, 200)).save(path / "blue.png")
    return path


def direct_answer(folder, prompt, image=None, max_new_tokens=6):
    """Greedy answer computed without the CLI: the Vicuna v1 prompt written out by hand."""
    from transformers import AutoProcessor

    model, processor = pmod.load(folder).eval(), AutoProcessor.from_pretrained(folder)
    text = f"{VICUNA_SYSTEM} USER: " + ("<image>\n" if image else "") + f"{prompt} ASSISTANT:"
    images = [Image.open(folder / image).convert("RGB")] if image else None
    inputs = processor(text=[text], images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def test_single_prompt_streams_the_greedy_answer(folder, capsys):
    rc = main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt",
               "What color is the shape ?", "--max-new-tokens", "6"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.strip() == direct_answer(folder, "What color is the shape ?", "red.png")
    assert "KV cache:" in captured.err and "dense model:" in captured.err


def test_batch_file_matches_single_answers(folder, capsys):
    records = [
        {"image": "red.png", "prompt": "What color is the shape ?"},
        {"prompt": "How many shapes are there ?"},
        {"image": "blue.png", "prompt": "Is the circle on the left ?"},
    ]
    batch_file = folder / "questions.jsonl"
    batch_file.write_text("\n".join(json.dumps(r) for r in records))
    rc = main(["generate", "--model", str(folder), "--batch-file", str(batch_file), "--batch-size", "3",
               "--max-new-tokens", "6"])  # fmt: skip
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == [r["prompt"] for r in records]
    for line, record in zip(lines, records):
        assert line["answer"] == direct_answer(folder, record["prompt"], record.get("image"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "does not exist"),
        ("bad_image", "cannot be read as an image"),
        ("not_llava", "not a LLaVA model"),
        ("too_long", "model's context is"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path, capsys, case, message):
    model, image, prompt = str(folder), str(folder / "red.png"), "What color ?"
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    elif case == "bad_image":
        (tmp_path / "bad.png").write_text("not a png")
        image = str(tmp_path / "bad.png")
    elif case == "not_llava":
        tiny_llama(num_layers=2).save_pretrained(tmp_path / "llama")
        model = str(tmp_path / "llama")
    else:
        prompt = "what " * 5000
    rc = main(["generate", "--model", model, "--image", image, "--prompt", prompt, "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("pmod generate: error:")


@pytest.mark.parametrize(
    "config",
    [pmod.MoDConfig(), pmod.GammaMoDConfig(layers=[1, 2, 4]), pmod.FastVConfig(layer=2, keep=0.5)],
    ids=lambda c: c.method,
)
def test_generate_with_every_method(tmp_path, capsys, config):
    folder = tmp_path / config.method
    tiny_llava_folder(str(folder), num_layers=6, method_config=config)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    rc = main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt",
               "What color is the shape ?", "--max-new-tokens", "6"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert captured.out.strip() == direct_answer(folder, "What color is the shape ?", "red.png")
    share = float(captured.err.split("dense model:")[1].split(",")[1].split("%")[0]) / 100
    assert 0 < share < 1  # the routed layers cache fewer tokens


def test_budget_picks_the_setting_flops_picks_and_answers_with_it(tmp_path, capsys):
    """pmod generate --method fastv --budget: the keep that pmod flops --budget picks for the same folder and prompt
    length, and the answer that keep gives when passed by hand."""
    dense = tmp_path / "dense"
    tiny_llava_folder(str(dense), num_layers=6)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    base = ["generate", "--model", str(dense), "--image", str(tmp_path / "red.png"), "--prompt",
            "What color is the shape ?", "--max-new-tokens", "4", "--method", "fastv"]  # fmt: skip
    assert main([*base, "--budget", "0.9"]) == 0
    captured = capsys.readouterr()
    keep = float(captured.err.split("fastv keep = ")[1].split()[0])
    n_text = int(captured.err.split(" vision + ")[1].split()[0])
    assert main(["flops", str(dense), "--method", "fastv", "--budget", "0.9", "--text-tokens", str(n_text)]) == 0
    assert float(capsys.readouterr().err.split("fastv keep = ")[1].split()[0]) == keep
    assert main([*base, "--fastv-keep", str(keep)]) == 0
    assert capsys.readouterr().out == captured.out
    assert main([*base[:-2], "--budget", "0.9"]) == 2  # no --method: nothing to set
    assert "--budget chooses a training-free method's setting: pass --method" in capsys.readouterr().err
