"""`pmod import-llava` on tiny checkpoints written here in the original LLaVA / p-MoD format (LLaVA code base on
transformers 4.37): the imported logits equal a forward assembled by hand from the raw source tensors (CLIP features
of layer -2, the projector as matmuls, a dense Llama, and ``pmod.testing.reference`` for p-MoD layers), every source
tensor arrives unchanged, the processor expands ``<image>`` to the model's count, generation runs, and bad sources
get one-line errors that leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import pmod
from pmod.cli import main
from pmod.core.errors import UserError
from pmod.data.tokenizer import VICUNA_SYSTEM, image_processor_class
from pmod.io.importers.original_config import count_exact, original_ratios, weight_norm
from pmod.io.importers.original_llava import import_llava
from pmod.io.importers.original_processor import load_tokenizer
from pmod.io.importers.tensor_files import TensorFolder
from pmod.io.model_folder import encode, load_model
from pmod.testing.reference import VisionRouterReference, reference_logits

S, PATCH, LAYERS = 16, 4, 4  # tower image size and patch (4 x 4 = 16 tokens per tile); decoder layers
P = S // PATCH
WORDS = f"{VICUNA_SYSTEM} USER : ASSISTANT what is in the image ? a red blue square circle ."
# p-MoD on 4 layers: cos(pi l / 31) / 2 + 0.1 is 0.6, 0.597, 0.590, 0.577 -> layers 1-3 routed at those ratios.
SCHEDULE = (0.1, 0.598, 0.15)  # mod_router_factor, then shiftedcos_decay_MAX_MIN
PMOD_KEYS = dict(mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_special_init=True,
                 mod_target_token_type="vision_all")  # fmt: skip
Imported = tuple[str, Path, dict[str, torch.Tensor]]  # case, imported folder, source tensors
CASES = {  # name: (p-MoD, anyres)
    "llava-1.5": (False, False),
    "llava-next": (False, True),
    "pmod-llava-1.5": (True, False),
    "pmod-llava-next": (True, True),
}


def original_ratio(layer: int, factor: float, max_ratio: float, min_ratio: float) -> float | None:
    """The original code's shifted-cosine schedule, written out again (31 whatever the depth)."""
    r = math.cos(layer * math.pi / 31) / 2 + factor
    return None if r > max_ratio else max(r, min_ratio)


def source_llama_config(layers: int, vocab: int) -> LlamaConfig:
    """The language model of the tiny original-format checkpoints (Vicuna's layout at width 64)."""
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2)  # fmt: skip


def write_tokenizer(folder: Path) -> int:
    """A word-level stand-in for the sentencepiece LLaMA tokenizer: ``<unk> <s> </s>``, no image or pad token."""
    words = sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(WORDS)})
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.pad_token = tok.unk_token  # as the LLaVA training code saves it
    tok.save_pretrained(folder)
    return len(vocab)


def tower_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=S, patch_size=PATCH
    )


def tower_folder(root: Path, preprocessor: bool = False) -> Path:
    """A local CLIP vision folder without weights (the checkpoints below carry the tower's): its config, and with
    ``preprocessor`` its preprocessor_config.json (bilinear, to tell it from the built-in CLIP settings)."""
    folder = root / ("clip-local" if preprocessor else "clip-config")
    if not folder.exists():
        tower_config().save_pretrained(folder)
        if preprocessor:
            clip_processor = image_processor_class("CLIPImageProcessor")
            clip_processor(size={"shortest_edge": S}, crop_size=S, resample=2).save_pretrained(folder)
    return folder


def write_source(
    folder: Path,
    case: str,
    layers: int = LAYERS,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    drop: str = "",
    schedule: tuple[float, float, float] = SCHEDULE,
    **overrides,
) -> dict[str, torch.Tensor]:
    """An original-format checkpoint (config.json, two safetensors shards + index, tokenizer); returns its tensors.
    Its ``mm_vision_tower`` is a local CLIP folder next to it (the original code accepts a path there)."""
    pmod_source, anyres = CASES[case]
    folder.mkdir(parents=True)
    tower = str(tower_folder(folder.parent, preprocessor=True))
    vocab = write_tokenizer(folder)
    torch.manual_seed(seed)
    llama = source_llama_config(layers, vocab)
    lm = LlamaForCausalLM(llama).state_dict()
    ratios = [original_ratio(i, *schedule) for i in range(layers)] if pmod_source else [None] * layers
    tensors = {}
    for key, value in lm.items():
        n = key.split(".")[2] if key.startswith("model.layers.") else None
        if n is not None and ratios[int(n)] is not None:
            key = key.replace(f"layers.{n}.", f"layers.{n}.decoder_layer.")
        tensors[key] = torch.randn(value.shape) * (0.3 if value.dim() > 1 else 0.1) + (value.dim() == 1)
    for i, r in enumerate(ratios):
        if r is not None:
            tensors[f"model.layers.{i}.router.router.weight"] = torch.randn(1, 64)
            tensors[f"model.layers.{i}.router.router.bias"] = torch.randn(1)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)  # saved by older transformers; dropped
    tensors.update(
        {
            "model.mm_projector.0.weight": torch.randn(64, 32) * 0.2,
            "model.mm_projector.0.bias": torch.randn(64),
            "model.mm_projector.2.weight": torch.randn(64, 64) * 0.2,
            "model.mm_projector.2.bias": torch.randn(64),
            "model.image_newline": torch.randn(64),
        }
    )
    for key, value in CLIPVisionModel(tower_config()).state_dict().items():
        tensors[f"model.vision_tower.vision_tower.vision_model.{key}"] = torch.randn(value.shape) * 0.2 + (
            value.dim() == 1
        )
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items() if k != drop}
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {  # the keys a transformers 4.37 LlamaConfig saves, then LLaVA's and p-MoD's
        **{k: getattr(llama, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size",
                                          "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                          "rms_norm_eps", "hidden_act", "initializer_range", "tie_word_embeddings")},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1, "use_cache": True,
        "transformers_version": "4.37.2", "torch_dtype": str(dtype).removeprefix("torch."),
        "model_type": "pmod_llava_llama" if pmod_source else "llava_llama",
        "architectures": ["PmodLlavaLlamaForCausalLM" if pmod_source else "LlavaLlamaForCausalLM"],
        "mm_vision_tower": tower, "mm_hidden_size": 32, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "image_aspect_ratio": "anyres" if anyres else "pad",
        "mm_patch_merge_type": "spatial_unpad" if anyres else "flat",
        # (width, height) as the original reads them; one-sided, so that reading them as (height, width) shows
        "image_grid_pinpoints": [[2 * S, S], [2 * S, 2 * S]],
        **(dict(PMOD_KEYS, mod_router_factor=schedule[0], mod_target_layers="shiftedcos_decay_{}_{}".format(
            *schedule[1:])) if pmod_source else {}),
        **overrides,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return tensors


def write_clip_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A whole-CLIP folder as openai/clip-vit-large-patch14-336 is laid out (vision_model.*, text_model.*, ...)."""
    folder.mkdir()
    CLIPConfig(vision_config=tower_config().to_dict()).save_pretrained(folder)
    state = {
        k.removeprefix("model.vision_tower.vision_tower."): v.float()
        for k, v in tensors.items()
        if k.startswith("model.vision_tower.")
    }
    state |= {"text_model.final_layer_norm.weight": torch.ones(8), "logit_scale": torch.tensor(2.0)}
    save_file(state, str(folder / "model.safetensors"))


def hf_name(key: str) -> str:
    """Where the test expects each source tensor in the Hugging Face model."""
    key = key.replace("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.")
    key = key.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
    key = key.replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
    key = key.replace(".decoder_layer.", ".").replace(".router.router.", ".router.")
    for part in ("embed_tokens", "layers", "norm"):
        key = key.replace(f"model.{part}", f"model.language_model.{part}")
    return key


# ------------------------------------------------------------------------------------------ the hand-built forward
def image_features(tensors: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """CLIP hidden states of layer -2 without CLS, through the projector written as matmuls: [tiles, P*P, 64]."""
    tower = CLIPVisionModel(tower_config()).eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower.load_state_dict({k.removeprefix(prefix): v.float() for k, v in tensors.items() if k.startswith(prefix)})
    with torch.no_grad():
        x = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    x = torch.nn.functional.gelu(x @ tensors["model.mm_projector.0.weight"].T + tensors["model.mm_projector.0.bias"])
    return x @ tensors["model.mm_projector.2.weight"].T + tensors["model.mm_projector.2.bias"]


def next_features(tensors: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT features of an (S, 2S) image: the base tile, then the 1 x 2 tile grid row by row, each row ended
    by image_newline (the grid fits the image exactly: nothing to unpad)."""
    f = image_features(tensors, pixels)
    grid = torch.cat([f[1].view(P, P, -1), f[2].view(P, P, -1)], dim=1)  # [P rows, 2P columns, D]
    rows = torch.cat([grid, tensors["model.image_newline"].expand(P, 1, -1)], dim=1)
    return torch.cat([f[0], rows.reshape(-1, f.shape[-1])])


def hand_logits(
    tensors: dict[str, torch.Tensor], input_ids: torch.Tensor, image_id: int, features: torch.Tensor, case: str
) -> torch.Tensor:
    """A dense Llama with the source weights on the hand-made input embeddings; p-MoD layers through the reference
    rule with the source routers and the original code's ratios."""
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    dense = LlamaForCausalLM(source_llama_config(LAYERS, vocab)).eval()
    dense.load_state_dict(
        {
            hf_name(k).replace("model.language_model.", "model."): v
            for k, v in tensors.items()
            if "router" not in k
            and not k.startswith(("model.mm_", "model.vision", "model.image"))
            and "inv_freq" not in k
        }
    )
    vision = input_ids[0] == image_id
    embeds = dense.model.embed_tokens(input_ids[0].clamp(max=vocab - 1)).detach()
    embeds[vision] = features
    # The reference forward looks tokens up by id: position t's "token" t embeds to the hand-made embedding.
    dense.model.embed_tokens = torch.nn.Embedding.from_pretrained(embeds)
    rules = {}
    for i in range(LAYERS):
        if CASES[case][0] and (r := original_ratio(i, *SCHEDULE)) is not None:
            router = torch.nn.Linear(64, 1)
            router.load_state_dict(
                {
                    "weight": tensors[f"model.layers.{i}.router.router.weight"],
                    "bias": tensors[f"model.layers.{i}.router.router.bias"],
                }
            )
            rules[i] = VisionRouterReference(router, r, "tanh", 0.2, 1.0, string=True)
    ids = torch.arange(len(embeds))[None]
    with torch.no_grad():
        return reference_logits(dense, rules, ids, torch.ones_like(ids), vision[None])[0]


# ----------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module", params=list(CASES))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Imported:
    case = request.param
    root = tmp_path_factory.mktemp(case)
    # The released configs name the hub tower; its config (not its weights) comes from --vision-tower here.
    tensors = write_source(root / "src", case, mm_vision_tower="openai/clip-vit-large-patch14-336")
    dst = import_llava(root / "src", root / "dst", vision_tower=tower_folder(root), max_shard_bytes=60_000)
    assert dst == root / "dst" and len(list(dst.glob("model-*-of-*.safetensors"))) > 2
    return case, root / "dst", tensors


def test_logits_equal_hand_built_forward(imported: Imported) -> None:
    case, dst, tensors = imported
    model, processor = load_model(dst, "cpu")
    anyres = CASES[case][1]
    assert type(model) is (LlavaNextForConditionalGeneration if anyres else LlavaForConditionalGeneration)
    assert pmod.is_routed_model(model) == CASES[case][0]
    noise = torch.randint(0, 256, (S, 2 * S, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    image = Image.fromarray(noise.numpy())  # an (S, 2S) image: PIL's size is (width, height) = (2S, S)
    inputs = encode(processor, model, ["what is in the image ?"], [[image]])
    image_id = model.config.image_token_id
    with torch.no_grad(), pmod.record_routing(model) if CASES[case][0] else contextlib.nullcontext() as rec:
        got = model(**inputs).logits[0]
    pixels = inputs["pixel_values"][0] if anyres else inputs["pixel_values"]
    features = next_features(tensors, pixels) if anyres else image_features(tensors, pixels)[0]
    assert int((inputs["input_ids"] == image_id).sum()) == len(features)
    want = hand_logits(tensors, inputs["input_ids"], image_id, features, case)
    vocab = want.shape[-1]
    torch.testing.assert_close(got[:, :vocab], want, atol=1e-5, rtol=1e-5)
    assert bool((got[:, vocab:].max(-1).values < got[:, :vocab].max(-1).values).all())  # added rows never win
    if CASES[case][0]:  # routing really dropped vision tokens in the routed layers
        n_vision = len(features)
        assert {i: int(m[0].sum()) for i, m in rec.processed.items()} == {
            i: int(inputs["input_ids"].shape[1]) - n_vision + math.floor(n_vision * original_ratio(i, *SCHEDULE))
            for i in (1, 2, 3)
        }


def test_every_source_tensor_arrives_unchanged(imported: Imported) -> None:
    case, dst, tensors = imported
    model = (
        pmod.load(dst)
        if CASES[case][0]
        else LlavaForConditionalGeneration.from_pretrained(dst)
        if not CASES[case][1]
        else LlavaNextForConditionalGeneration.from_pretrained(dst)
    )
    state = model.state_dict()
    sources = {k: v for k, v in tensors.items() if "inv_freq" not in k}
    if not CASES[case][1]:
        sources.pop("model.image_newline")  # LLaVA-1.5 saves it unused; transformers' conversion drops it too
    assert {hf_name(k) for k in sources} == set(state)  # nothing lost, nothing invented
    for key, value in sources.items():
        got = state[hf_name(key)]
        if "embed_tokens" in key or "lm_head" in key:
            assert got.shape[0] % 64 == 0 and got.shape[0] >= value.shape[0] + 2
            added = got[value.shape[0] :]  # new rows (<image>, <pad>, padding to 64): the mean of the original rows
            torch.testing.assert_close(added, value.float().mean(0).expand_as(added).to(value.dtype))
            got = got[: value.shape[0]]
        assert got.dtype == value.dtype and torch.equal(got, value), key


def test_processor_expands_image_tokens_like_the_model(imported: Imported) -> None:
    case, dst, _ = imported
    model, processor = load_model(dst, "cpu")
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id == len(tok) - 2
    assert tok.pad_token == "<pad>" and tok.pad_token_id == len(tok) - 1
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}],
        add_generation_prompt=True,
    )
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nwhat ? ASSISTANT:"  # Vicuna v1, as the original models chat
    assert processor.image_processor.resample == 3  # the built-in CLIP-336 settings: bicubic
    # LLaVA-1.5 ("pad") pads a wide image to a square with the mean colour first; NeXT's base tile is squashed.
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    colour = (torch.tensor([200, 30, 60]) / 255 - mean) / std
    pad = (torch.tensor([int(m * 255) for m in OPENAI_CLIP_MEAN]) / 255 - mean) / std
    wide = encode(processor, model, ["what ?"], [[Image.new("RGB", (2 * S, S), (200, 30, 60))]])["pixel_values"]
    base = wide[0, 0] if CASES[case][1] else wide[0]
    torch.testing.assert_close(base[:, 0, 0], colour if CASES[case][1] else pad, atol=0.02, rtol=0)
    torch.testing.assert_close(base[:, S // 2, S // 2], colour, atol=0.02, rtol=0)
    for size in [(S, S), (2 * S + 3, S - 5), (S + 7, 3 * S)]:  # (width, height), odd sizes: padding and unpadding
        inputs = encode(processor, model, ["what ?"], [[Image.new("RGB", size, (9, 99, 199))]])
        n = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():
            kwargs = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
            feats = model.model.get_image_features(inputs["pixel_values"], **kwargs).pooler_output
        assert n == sum(len(f) for f in feats) and (n == P * P) != CASES[case][1]


def test_generate_equals_recomputation(imported: Imported) -> None:
    """Generation (as ``pmod generate`` loads and encodes) equals recomputation without cache; a plain import
    converts to any method, and its cached generation equals recomputation too."""
    case, dst, _ = imported
    model, processor = load_model(dst, "cpu")
    inputs = encode(processor, model, ["what is in the image ?", "what ?"], [[Image.new("RGB", (S, S))]] * 2)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=pad)
        again = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=pad, use_cache=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3) and torch.equal(out, again)
    if not CASES[case][0]:
        pmod.convert(model, pmod.MoDConfig(ratio=0.5, layers=[1, 2]))
        with torch.no_grad(), pmod.record_routing(model) as rec:
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2 and sorted(rec.processed) == [1, 2]
        with torch.no_grad():  # cached decoding of the routed model against recomputation without cache
            again = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=pad, use_cache=False)
        assert torch.equal(out, again)


def test_forty_layer_pmod_gets_the_original_ratios(tmp_path: Path) -> None:
    write_source(tmp_path / "src", "pmod-llava-1.5", layers=40, schedule=(0.5, 0.85, 0.15))
    import_llava(tmp_path / "src", tmp_path / "dst")
    got = pmod.layer_ratios(pmod.load(tmp_path / "dst"))
    want = [original_ratio(i, 0.5, 0.85, 0.15) for i in range(40)]
    assert [r is None for r in got] == [r is None for r in want] == [True] * 8 + [False] * 32
    assert got == [None] * 8 + [pytest.approx(r, abs=1e-7) for r in want[8:]]
    assert got[8] == pytest.approx(0.8445, abs=1e-4) and got[31] == 0.15
    assert got[39] == pytest.approx(math.cos(39 * math.pi / 31) / 2 + 0.5)  # the cosine comes back up after 31
    settings = json.loads((tmp_path / "dst" / "config.json").read_text())["pmod_method"]["settings"]
    assert (settings["weight_norm"], settings["weight_scale"], settings["weight_bias"], settings["string"]) == (
        "tanh",
        0.2,
        1.0,
        True,
    )


def test_original_schedules_and_weight_norms() -> None:
    # Routed when decay <= max (not <): a schedule that routes layer 0 (pmod_config then refuses it).
    assert original_ratios("shiftedlinear_decay_1.0_0.15", 0.5, 3)[0] == 1.0
    # pmod counts floor(n * r) in float64, the original trunc(n * r) in float32: the imported ratio keeps its counts.
    layer10 = original_ratios("shiftedcos_decay_0.85_0.15", 0.5, 32)[10]
    n = torch.arange(1, 4097, dtype=torch.int32)
    original = torch.trunc(n.float() * torch.tensor(layer10, dtype=torch.float32)).long()
    assert math.floor(2365 * layer10) == 1807 and original[2364] == 1808  # the two differ here
    exact = count_exact(layer10, 4096)
    assert abs(exact - layer10) < 1e-7 and torch.equal(torch.floor(n.double() * exact).long(), original)
    linear = original_ratios("shiftedlinear_decay_0.85_0.15", 0.5, 32)
    assert linear[:5] == [None] * 5 and linear[5] == pytest.approx(1 - 5 / 31) and linear[-1] == 0.15
    assert original_ratios("deep_all", 0.5, 6) == [None, None, 0.5, 0.5, 0.5, None]
    assert original_ratios("interleave", 0.3, 5) == [None, 0.3, None, 0.3, None]
    assert weight_norm("tanh_0.2_1") == ("tanh", 0.2, 1.0) and weight_norm("sigmoid_2_-0.5") == ("sigmoid", 2.0, -0.5)
    assert weight_norm("none") == ("none", 1.0, 1.0)  # a bare name runs with scale 1, bias 1 in the original
    for bad in ("softmax", "tanh_0.2", "relu_1_0", None):
        with pytest.raises(UserError, match="mod_weight_norm"):
            weight_norm(bad)


def test_bf16_bin_source_keeps_dtype_and_tower_comes_from_folder(tmp_path: Path) -> None:
    """A ``pytorch_model.bin`` source in bf16 without the tower: the tower comes from a whole-CLIP folder (fp32,
    cast to the model's dtype), every checkpoint tensor stays bf16 bit for bit; ``dtype="fp32"`` casts."""
    full = write_source(
        tmp_path / "full", "pmod-llava-1.5", dtype=torch.bfloat16, mm_vision_tower="openai/clip-vit-large-patch14-336"
    )
    write_clip_folder(tmp_path / "clip", full)
    src = tmp_path / "src"
    shutil.copytree(tmp_path / "full", src)
    for p in src.glob("model*.safetensors*"):
        p.unlink()
    ckpt = {k: v for k, v in full.items() if not k.startswith("model.vision_tower.")}
    torch.save(ckpt, src / "pytorch_model.bin")
    with pytest.raises(UserError, match="--vision-tower"):
        import_llava(src, tmp_path / "no-tower")
    assert not (tmp_path / "no-tower").exists()
    import_llava(src, tmp_path / "dst", vision_tower=tmp_path / "clip")
    state = pmod.load(tmp_path / "dst").state_dict()
    for key, value in full.items():
        if "inv_freq" in key or key == "model.image_newline":
            continue
        got = state[hf_name(key)][: value.shape[0]]
        assert got.dtype == torch.bfloat16 and torch.equal(got, value), key
    import_llava(src, tmp_path / "fp32", vision_tower=tmp_path / "clip", dtype="fp32")
    state = pmod.load(tmp_path / "fp32", dtype="auto").state_dict()
    assert state["lm_head.weight"].dtype == torch.float32
    assert torch.equal(state["model.language_model.norm.weight"], full["model.norm.weight"].float())


def test_llama_tokenizer_gets_image_and_pad_tokens(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("▁abcdefghij")}}
    LlamaTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    tok = load_tokenizer(tmp_path)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(vocab), len(vocab) + 1]
    assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("a") == vocab["a"]
    assert tok("a <image>", add_special_tokens=False).input_ids.count(len(vocab)) == 1
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(mod_target_layers="shiftedsin_decay_0.85_0.15"), "mod_target_layers='shiftedsin_decay"),
        (dict(mod_weight_norm="softmax"), "mod_weight_norm='softmax'.*softmax over the sequence"),
        (dict(mm_projector_type="linear"), "mm_projector_type='linear'.*mlp2x_gelu"),
        (dict(mod_target_token_type="all"), "mod_target_token_type='all'"),
        (dict(model_type="llava_mistral"), "model_type='llava_mistral'"),
        (dict(mm_vision_tower="google/siglip-so400m-patch14-384"), "pass --vision-tower DIR"),
        (dict(mod_target_layers="interleave"), r"layers \[1, 2, 3\] as routed .*'interleave' routes layers \[1, 3\]"),
        (dict(model_type="llava_llama"), r"layers \[1, 2, 3\] as routed .*'llava_llama' routes none"),
        (
            dict(drop="model.layers.2.decoder_layer.mlp.up_proj.weight"),
            r"no tensor model\.layers\.2\.decoder_layer\.mlp\.up_proj\.weight, expected with shape \[128, 64\]",
        ),
        (dict(drop="model.layers.3.router.router.bias"), r"no tensor model\.layers\.3\.router\.router\.bias"),
        (dict(hidden_size=48), r"has shape \[.*64.*\] but the config gives"),
    ],
)
def test_bad_sources_get_one_line_errors(tmp_path: Path, change: dict, message: str) -> None:
    write_source(tmp_path / "src", "pmod-llava-1.5", **change)
    with pytest.raises(UserError, match=message) as err:
        import_llava(tmp_path / "src", tmp_path / "dst")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-local", "src"]  # nothing written, nothing partial


def test_missing_tensor_and_failed_write_leave_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_source(tmp_path / "src", "llava-1.5")
    (tmp_path / "src" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors"):
        import_llava(tmp_path / "src", tmp_path / "dst")
    shutil.rmtree(tmp_path / "src")
    write_source(tmp_path / "src", "llava-1.5")
    real, reads = TensorFolder.read, []

    def failing(self: TensorFolder, name: str) -> torch.Tensor:
        reads.append(name)
        if len(reads) == 40:  # a few shards in: the disk fills up
            raise OSError("disk full")
        return real(self, name)

    monkeypatch.setattr(TensorFolder, "read", failing)
    with pytest.raises(OSError, match="disk full"):
        import_llava(tmp_path / "src", tmp_path / "dst", max_shard_bytes=60_000)
    assert len(reads) == 40 and sorted(p.name for p in tmp_path.iterdir()) == ["clip-local", "src"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_source(tmp_path / "src", "pmod-llava-next")
    assert main(["import-llava", str(tmp_path / "src"), "--out", str(tmp_path / "dst"), "--dtype", "bf16"]) == 0
    assert "pmod.load (3 routed layers, 1-3)" in capsys.readouterr().err
    # mm_vision_tower is a local folder here: its preprocessor_config.json (bilinear) is the one used.
    assert json.loads((tmp_path / "dst" / "processor_config.json").read_text())["image_processor"]["resample"] == 2
    assert main(["import-llava", str(tmp_path / "src"), "--out", str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pmod import-llava: error:") and "already exists" in err and "\n" not in err
    assert pmod.load(tmp_path / "dst").dtype == torch.bfloat16
    Image.new("RGB", (2 * S, S), (200, 30, 60)).save(tmp_path / "red.png")
    argv = ["generate", "--model", str(tmp_path / "dst"), "--image", str(tmp_path / "red.png"), "--prompt", "what ?"]
    assert main([*argv, "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "KV cache:" in capsys.readouterr().err


def test_rerun_after_a_killed_import_removes_its_staging(tmp_path: Path) -> None:
    write_source(tmp_path / "src", "llava-1.5")
    stale = tmp_path / ".dst.k1ll3d.partial"  # what an import killed while writing leaves beside --out
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    assert main(["import-llava", str(tmp_path / "src"), "--out", str(tmp_path / "dst")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-local", "dst", "src"]
