"""`pmod generate` (an image, two images, a video) and `pmod train` stage 2 at the command line on Qwen2-VL,
Qwen2.5-VL, Qwen3-VL and LLaVA-OneVision folders holding a tiny random model and a real saved processor (the
families' own processor classes over a word-level tokenizer, built in code; no downloads).

Their video processors import torchvision: the README's environment has it (torch and torchvision as a matching
pair), and tests/test_environment.py fails there without it; an install without torchvision skips this file."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torchvision", reason="the Qwen-VL / OneVision video processors need torchvision")

import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

import pmod  # noqa: E402
from pmod.cli import main  # noqa: E402
from pmod.core.backbone import backbone_for  # noqa: E402
from pmod.data.dataset import LlavaDataset  # noqa: E402
from pmod.data.tokenizer import build_word_tokenizer  # noqa: E402
from pmod.testing import randomize_routers  # noqa: E402
from pmod.testing.multimodal import (  # noqa: E402
    END_ID,
    IMAGE_ID,
    START_ID,
    VIDEO_ID,
    VOCAB,
    tiny_llava_onevision,
    tiny_qwen_vl,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"]
WORDS = ["user assistant what is in the picture video red blue green shape a an it and 0 1 2 3 4 5 6 7 8 9 seconds"]
QUESTION = "what is in the picture ?"
# The chat layout of the families' own templates: <|im_start|>role ... <|im_end|>, and each image / video where
# the real template puts it (Qwen: <|vision_start|><|image_pad|><|vision_end|>; OneVision: <image>, <video>).
TEMPLATE = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}{%- for c in m['content'] -%}"
    "{%- if c['type'] == 'image' -%}IMAGE{%- elif c['type'] == 'video' -%}VIDEO{%- else -%}{{ c['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{{ '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
QWEN_TEMPLATE = TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>").replace(
    "VIDEO", "<|vision_start|><|video_pad|><|vision_end|>"
)
RATIOS = [None, 0.9, 0.5, 0.25]
FRAMES = 4
# Vision tokens the family's own rule gives for a.png, a.png + b.png and the 4-frame video (sizes in `folders`).
# Qwen-VL: (H / 2p) x (W / 2p) merged patches an image (sizes are multiples of 2p inside the pixel bounds, so none
# is resized), the same per pair of frames. OneVision (32-px tiles of 8-px patches, 16 tokens a tile): a prompt's
# one image is anyres: 128x64 onto the 64x32 pinpoint = the base tile (16) + 4 rows of 8 tokens + 4 newlines = 52;
# in a prompt with several images each is its base tile and a newline (17); a video is a 2x2-pooled tile a frame
# (4 tokens) and one newline = 17.
EXPECTED = {
    "qwen2_vl": {"image": 8, "two_images": 12, "video": 8},
    "qwen2_5_vl": {"image": 8, "two_images": 12, "video": 8},
    "qwen3_vl": {"image": 8, "two_images": 12, "video": 8},
    "llava_onevision": {"image": 52, "two_images": 34, "video": 17},
}


def word_tokenizer(specials: dict[str, int], named: dict[str, str]) -> transformers.PreTrainedTokenizerFast:
    """pmod's word-level tokenizer, its vocabulary padded so that ``specials`` land at exactly the model's ids, then
    filled up to the model's vocabulary (every id the model can emit decodes to a word)."""
    fill = min(specials.values()) - len(build_word_tokenizer(WORDS, include_template_words=False))
    words = WORDS + [f"w{i}" for i in range(fill)]
    backend = build_word_tokenizer(words, include_template_words=False).backend_tokenizer
    ordered = sorted(specials, key=specials.get)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ordered])
    backend.add_tokens([f"x{i}" for i in range(backend.get_vocab_size(), VOCAB)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=named,
    )  # fmt: skip
    assert tokenizer.convert_tokens_to_ids(list(specials)) == list(specials.values())
    assert len(tokenizer) == VOCAB
    return tokenizer


def build(family: str) -> tuple[torch.nn.Module, object, int]:
    """(dense model, its processor, the pixel unit of its test images)."""
    if family == "llava_onevision":
        model = tiny_llava_onevision(num_layers=4)
        tokenizer = word_tokenizer({"<video>": VIDEO_ID, "<|im_start|>": START_ID, "<|im_end|>": END_ID},
                                   {"image_token": "<image>", "video_token": "<video>"})  # fmt: skip
        model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")  # id 4 in pmod's tokenizer
        side = model.config.vision_config.image_size
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(
                size={"height": side, "width": side}, image_grid_pinpoints=model.config.image_grid_pinpoints
            ),
            video_processor=transformers.LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
            tokenizer=tokenizer,
            chat_template=TEMPLATE.replace("IMAGE", "<image>").replace("VIDEO", "<video>"),
            num_image_tokens=(side // model.config.vision_config.patch_size) ** 2,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        )
        return model, processor, side
    model = tiny_qwen_vl(family, num_layers=4)
    tokenizer = word_tokenizer(
        {"<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID, "<|vision_start|>": START_ID,
         "<|vision_end|>": END_ID, "<|im_start|>": END_ID + 1, "<|im_end|>": END_ID + 2},
        {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
         "vision_end_token": "<|vision_end|>"},
    )  # fmt: skip
    vision = model.config.vision_config
    unit = vision.patch_size * vision.spatial_merge_size  # one merged token
    sizes = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                 temporal_patch_size=vision.temporal_patch_size)  # fmt: skip
    pixels = {"shortest_edge": 4 * unit**2, "longest_edge": 16 * unit**2}
    images = transformers.Qwen2VLImageProcessor(size=pixels, **sizes)
    if family == "qwen3_vl":  # its video bounds count all frames together
        video = transformers.Qwen3VLVideoProcessor(size={k: v * FRAMES for k, v in pixels.items()},
                                                   cap_pixels_per_frame=False, **sizes)  # fmt: skip
        cls = transformers.Qwen3VLProcessor
    else:
        video = transformers.Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=False, **sizes)
        cls = transformers.Qwen2_5_VLProcessor if family == "qwen2_5_vl" else transformers.Qwen2VLProcessor
    processor = cls(image_processor=images, video_processor=video, tokenizer=tokenizer, chat_template=QWEN_TEMPLATE)
    return model, processor, unit


def vision_ids(model: torch.nn.Module) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


@pytest.fixture(scope="module", params=FAMILIES)
def folders(request, tmp_path_factory) -> dict:
    """A dense and a routed (p-MoD, random routers) folder of one family, each with its processor, and the inputs:
    a.png (2 x 4 units), b.png (2 x 2 units), a folder of 4 frames (2 x 2 units)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model, processor, unit = build(family)
    # A random model may pick an image / video token; generating one would make a prompt the processor never
    # wrote. The folder's generation config leaves them out, for the CLI and for the checks here alike.
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=0, eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
        suppress_tokens=[*vision_ids(model), START_ID, END_ID],
    )  # fmt: skip
    model.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    pmod.convert(model, pmod.PModConfig(schedule="explicit", ratios=RATIOS))
    randomize_routers(model, scale=3.0)
    model.save_pretrained(root / "routed")
    processor.save_pretrained(root / "routed")
    g = torch.Generator().manual_seed(0)

    def image(w: int, h: int) -> Image.Image:
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())

    image(4 * unit, 2 * unit).save(root / "a.png")
    image(2 * unit, 2 * unit).save(root / "b.png")
    (root / "frames").mkdir()
    for i in range(FRAMES):
        image(2 * unit, 2 * unit).save(root / "frames" / f"{i:02d}.png")
    return {"family": family, "root": root}


def direct_answer(folder, images: list, videos: list) -> tuple[str, int, int]:
    """The greedy answer, computed here from pmod.load and the saved processor, with and without the KV cache
    (they must agree), and the numbers of image and video tokens the processor wrote."""
    model, processor = pmod.load(folder).eval(), transformers.AutoProcessor.from_pretrained(folder)
    content = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[images] if images else None, videos=videos or None, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cached = model.generate(**inputs, do_sample=False, max_new_tokens=8)[:, n:]
        recomputed = model.generate(**inputs, do_sample=False, max_new_tokens=8, use_cache=False)[:, n:]
    assert torch.equal(cached, recomputed)
    counts = [int((inputs["input_ids"] == token).sum()) for token in vision_ids(model)]
    return processor.batch_decode(cached, skip_special_tokens=True)[0].strip(), *counts


@pytest.mark.parametrize("case", ["image", "two_images", "video"])
def test_generate_answers_like_the_model(folders, case, capsys) -> None:
    root, family = folders["root"], folders["family"]
    names = {"image": ["a.png"], "two_images": ["a.png", "b.png"], "video": []}[case]
    flags = [token for name in names for token in ("--image", str(root / name))]
    frames = [sorted((root / "frames").iterdir())] if case == "video" else []
    if frames:
        flags += ["--video", str(root / "frames")]
    rc = main(["generate", "--model", str(root / "routed"), *flags, "--prompt", QUESTION, "--max-new-tokens", "8",
               "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    images = [Image.open(root / name).convert("RGB") for name in names]
    videos = [[Image.open(f).convert("RGB") for f in clip] for clip in frames]
    answer, n_image, n_video = direct_answer(root / "routed", images, videos)
    assert captured.out.strip() == answer and answer
    assert (n_image, n_video) == ((0, EXPECTED[family][case]) if case == "video" else (EXPECTED[family][case], 0))
    assert "KV cache:" in captured.err
    share = float(captured.err.split("dense model:")[1].split(",")[1].split("%")[0]) / 100
    assert 0 < share < 1  # the routed layers cache fewer tokens than the dense layer 0


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("folders", ["qwen2_5_vl", "llava_onevision"], indirect=True)
def test_train_stage2_keeps_the_tower_and_reloads(folders, tmp_path, monkeypatch, capsys) -> None:
    """`pmod train` (stage 2, p-MoD) from the dense folder on LLaVA-format records with one or two images: the vision
    tower stays bit-identical, the LLM and the routers learn, and the saved folder is the trained model."""
    from pmod.recipes import training

    root, family = folders["root"], folders["family"]
    answers = ["a red shape", "a blue shape", "it is green", "an image"]
    records = [{"id": str(i), "image": ["a.png", "b.png"][: 1 + i % 2], "conversations": [
        {"from": "human", "value": "<image>\n" * (1 + i % 2) + QUESTION}, {"from": "gpt", "value": answers[i]}]}
        for i in range(4)]  # fmt: skip
    (root / "train.json").write_text(json.dumps(records))
    trainers = []

    class Recorded(training.RoutedTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(training, "RoutedTrainer", Recorded)
    out = tmp_path / "out"
    rc = main(["train", "--model", str(root / "dense"), "--data-path", str(root / "train.json"), "--output-dir",
               str(out), "--max-steps", "3", "--per-device-train-batch-size", "2", "--learning-rate", "1e-3",
               "--logging-steps", "1", "--report-to", "none", "--use-cpu", "--save-strategy", "no",
               "--disable-tqdm", "true"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    (trainer,) = trainers
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 3 and {"pmod/processed/L1", "pmod/processed/L2", "pmod/processed/L3"} <= logs[-1].keys()

    before = weights(transformers.AutoModelForImageTextToText.from_pretrained(root / "dense"))
    trained = pmod.load(out).eval()
    after = weights(trained)
    adapter = backbone_for(trained)
    tower = [name for name in after if adapter.is_vision_parameter(name)]
    prefix = "model.visual." if family.startswith("qwen") else "model.vision_tower."
    assert tower and all(name.startswith(prefix) for name in tower)
    assert all(torch.equal(after[name], before[name]) for name in tower)
    assert not any(p.requires_grad for name, p in trainer.model.named_parameters() if name in tower)
    llm = [name for name in before if name.startswith("model.language_model.")]
    assert llm and sum(not torch.equal(after[name], before[name]) for name in llm) > len(llm) // 2
    routers = [name for name in after if name not in before]
    assert routers and all("router" in name for name in routers)
    # Zero at conversion; they learn, but for the last layer's: its skipped vision tokens only reach unlabelled
    # positions, so its router gets no gradient.
    assert any(after[name].abs().sum() > 0 for name in routers)

    processor = transformers.AutoProcessor.from_pretrained(out)
    # The training samples lay out their images as generation does (records 0 and 1: a.png; a.png and b.png).
    dataset = LlavaDataset(root / "train.json", processor)
    counts = [int((dataset[i]["input_ids"] == trained.config.image_token_id).sum()) for i in (0, 1)]
    assert counts == [EXPECTED[family]["image"], EXPECTED[family]["two_images"]]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": QUESTION}]}], add_generation_prompt=True)  # fmt: skip
    inputs = processor(text=[text], images=[[Image.open(root / "a.png").convert("RGB")]], return_tensors="pt")
    memory = trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trained(**inputs).logits, memory(**inputs).logits)
