"""`pmod generate` end to end on a tiny p-MoD LLaVA folder with a word-level processor."""

import json
import re

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


PROMPT = "What color is the shape ?"


def one_image_tokens(folder) -> tuple[int, int]:
    """(vision, text) tokens of one image and PROMPT, counted by hand: the tower's (image_size / patch_size)^2
    patches, and the Vicuna v1 prompt written out without its image placeholder."""
    from transformers import AutoProcessor

    vision = json.loads((folder / "config.json").read_text())["vision_config"]
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    ids = tokenizer(f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:")["input_ids"]
    placeholder = tokenizer.convert_tokens_to_ids("<image>")
    return (vision["image_size"] // vision["patch_size"]) ** 2, sum(1 for i in ids if i != placeholder)


def scaled(config, trained: list, factor: float):
    """``config`` with every routed share of ``trained`` (per layer) times ``factor``, at most 1: the issue's rule
    for a trained model at another budget, written again."""
    import dataclasses

    if config.method == "pmod":
        return dataclasses.replace(config, schedule="explicit",
                                   ratios=[None if r is None else min(1.0, r * factor) for r in trained])  # fmt: skip
    share = min(1.0, next(r for r in trained if r is not None) * factor)
    return dataclasses.replace(config, ratio=share) if config.method == "mod" else \
        dataclasses.replace(config, skip_ratio=1.0 - share)  # fmt: skip


def printed_setting(err: str) -> list[float | None]:
    """The per-layer ratios (pmod) or the one share (MoD's ratio, gamma-MoD's skip ratio) of the printed choice."""
    text = err.split(" = ", 1)[1].split(" gives ")[0]
    if text.startswith("["):
        return [None if v == "dense" else float(v) for v in text.strip("[]").split(", ")]
    return [float(text)]


@pytest.mark.parametrize("config", [None, pmod.MoDConfig(), pmod.GammaMoDConfig(layers=[1, 2, 4])],
                         ids=lambda c: "pmod" if c is None else c.method)  # fmt: skip
def test_budget_moves_a_routed_folder_as_set_budget_does(folder, tmp_path, capsys, monkeypatch, config):
    """pmod generate --budget B on a trained folder: the model it answers with has the ratios and the logits of the
    folder loaded and moved by pmod.set_budget(model, B) by hand for one image and the prompt, the same answer,
    the printed setting is set_budget's, every routed share is the trained one times one factor, and its analytic
    TFLOPs share is the nearest to B that such a factor reaches."""
    from transformers import AutoProcessor

    from pmod.analysis.analytic_flops import estimate
    from pmod.analysis.dims import LMDims
    from pmod.recipes import generate

    if config is not None:
        folder = tmp_path / config.method
        tiny_llava_folder(str(folder), num_layers=6, method_config=config)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    n_vision, n_text = one_image_tokens(folder)
    budget = 0.88
    seen, real_answer = {}, generate.answer

    def spy(model, *args, **kwargs):  # keeps the model the command answered with
        seen["model"] = model
        return real_answer(model, *args, **kwargs)

    monkeypatch.setattr(generate, "answer", spy)
    rc = main(["generate", "--model", str(folder), "--image", str(folder / "red.png"), "--prompt", PROMPT,
               "--max-new-tokens", "6", "--budget", str(budget)])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    model = pmod.load(folder).eval()
    trained, stored = pmod.layer_ratios(model), pmod.get_method_config(model)
    chosen = pmod.set_budget(model, budget, n_vision=n_vision, n_text=n_text)
    moved = pmod.layer_ratios(model)
    assert pmod.layer_ratios(seen["model"]) == moved != trained
    assert f"--budget {budget} of dense's tflops for {n_vision} vision + {n_text} text tokens: " in captured.err
    routed = [r for r in moved if r is not None]
    kind = "pmod" if config is None else config.method
    expected = {"pmod": moved, "mod": routed[:1], "gamma_mod": [1 - routed[0]]}[kind]
    printed = printed_setting(captured.err)
    assert [v is None for v in printed] == [v is None for v in expected]
    assert [v for v in printed if v is not None] == pytest.approx([v for v in expected if v is not None], rel=1e-5)
    assert [m is None for m in moved] == [t is None for t in trained]
    factor = max(m / t for m, t in zip(moved, trained) if m is not None and m < 1)
    for m, t in zip(moved, trained):  # one factor for every routed layer, a share clamped at 1
        assert m is None or m == pytest.approx(min(1.0, t * factor), rel=1e-12)
    dims = LMDims.from_config(model.config)

    def share(c) -> float:
        return estimate(dims, c, n_vision=n_vision, n_text=n_text).tflops_ratio

    grid = [share(scaled(stored, trained, f / 2000 / min(r for r in trained if r))) for f in range(1, 2001)]
    assert abs(share(chosen) - budget) <= min(abs(s - budget) for s in grid) + 1e-12
    assert abs(share(chosen) - budget) < 0.01
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=[f"{VICUNA_SYSTEM} USER: <image>\n{PROMPT} ASSISTANT:"],
                       images=[Image.open(folder / "red.png").convert("RGB")], return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.equal(seen["model"](**inputs).logits, logits)
        assert not torch.equal(pmod.load(folder).eval()(**inputs).logits, logits)  # the budget changed the model
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert captured.out.strip() == expected.strip()


def test_budget_refusals_on_routed_folders_are_one_line(folder, tmp_path, capsys):
    """Out of reach on a trained folder: the reachable range, before any weight loads; a VisionZip folder (it acts
    before the decoder, which set_budget cannot move): its dense base with --method instead."""
    zipped = tmp_path / "visionzip"
    tiny_llava_folder(str(zipped), num_layers=6, method_config=pmod.VisionZipConfig(dominant=4, contextual=2))
    capsys.readouterr()
    cases = [(folder, r"--budget 0\.3: pmod with its routed layers reaches tflops shares 0\.\d{4} to 1\.\d{4} of "
                      r"dense's here, not 0\.3; choose a budget in that range"),
             (zipped, rf"--budget: {zipped} runs visionzip before the decoder, which pmod.set_budget cannot move; "
                      rf"pass its dense base folder with --method visionzip --budget")]  # fmt: skip
    for model, message in cases:
        rc = main(["generate", "--model", str(model), "--image", str(folder / "red.png"), "--prompt", PROMPT,
                   "--budget", "0.3"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and re.fullmatch(f"pmod generate: error: {message}\n", err), err
