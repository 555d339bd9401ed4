"""The installed environment itself: what the README's set-up command builds must run every feature.

Two ways it broke before, each invisible to the rest of the suite:
- the eval extra keeps protobuf < 7 (lmms-eval pins wandb, wandb pins protobuf), and sentencepiece 0.2.3's generated
  protobuf code refuses a runtime older than 7.36, so transformers could not convert a sentencepiece-only
  ``tokenizer.model``, the only tokenizer file an original LLaVA-1.5 checkpoint ships (``pmod import-llava`` failed);
- the CUDA-built torchvision that lmms-eval pulls in failed to load beside a CPU-only torch, so the README removed it
  (and timm, which imports it), and the Qwen-VL / OneVision tests skipped themselves.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from pmod.core.errors import UserError
from pmod.io.importers.original_processor import IMAGE_TOKEN, PAD_TOKEN, load_tokenizer

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "USER: what colour is the shape in the image? ASSISTANT: a red circle on a blue square.",
    "the quick brown fox jumps over the lazy dog 1234567890",
]
#: Texts whose ids must come out the same: words, digits (split one by one), a double space, a newline, and
#: characters the model never saw (byte fallback).
TEXTS = [
    "what colour is the fox",
    "USER: a red  circle, 2024 ü€ 漢\nASSISTANT:",
    "digits 9876 and the shape?",
]


def _added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}  # fmt: skip


def sentencepiece_checkpoint(folder: Path) -> Path:
    """A folder with the tokenizer files of liuhaotian/llava-v1.5-7b, around a tiny sentencepiece model trained here
    with LLaMA's settings (BPE, byte fallback, split digits, <unk> <s> </s> = 0 1 2, no normalisation)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=340,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added("<s>"), "eos_token": _added("</s>"),
        "unk_token": _added("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def test_sentencepiece_only_tokenizer_converts_to_the_same_ids(tmp_path: Path) -> None:
    """``pmod import-llava``'s tokenizer step on a checkpoint with only ``tokenizer.model``: transformers converts it
    (through sentencepiece's generated protobuf code, which must match the installed protobuf) to ids equal to
    sentencepiece's own, with ``<image>`` and ``<pad>`` added after the original vocabulary."""
    folder = sentencepiece_checkpoint(tmp_path / "llava-v1.5")
    reference = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = load_tokenizer(folder)  # broken environment: "... cannot read it with the installed protobuf"
    for text in TEXTS:
        assert tokenizer(text).input_ids == [reference.bos_id()] + reference.encode(text), text
    size = reference.get_piece_size()
    assert tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN]) == [size, size + 1]
    assert tokenizer.pad_token == PAD_TOKEN and len(tokenizer) == size + 2


class _NewerGencode(importlib.abc.MetaPathFinder):
    """Loading sentencepiece's generated protobuf code fails as it does with sentencepiece 0.2.3 on protobuf 6."""

    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name == "sentencepiece.sentencepiece_model_pb2":
            from google.protobuf.runtime_version import VersionError

            raise VersionError(
                "Detected incompatible Protobuf Gencode/Runtime versions when loading sentencepiece_model.proto: "
                "gencode 7.36.1 runtime 6.33.6. Runtime version cannot be older than the linked gencode version. See "
                "Protobuf version guarantees at https://protobuf.dev/support/cross-version-runtime-guarantee."
            )


def test_sentencepiece_newer_than_protobuf_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where sentencepiece's generated code cannot load, transformers falls back to reading tokenizer.model as a
    tiktoken file and fails on a parse error that blames the checkpoint; the error names the versions and the fix."""
    folder = sentencepiece_checkpoint(tmp_path / "llava-v1.5")
    monkeypatch.delitem(sys.modules, "sentencepiece.sentencepiece_model_pb2", raising=False)
    monkeypatch.delattr(spm, "sentencepiece_model_pb2", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NewerGencode(), *sys.meta_path])
    with pytest.raises(UserError) as caught:
        load_tokenizer(folder)
    assert str(caught.value) == (
        f"{folder} has a sentencepiece tokenizer.model only, and the installed sentencepiece cannot read it with the "
        f'installed protobuf (gencode 7.36.1 runtime 6.33.6); pip install "sentencepiece<0.2.3" protobuf (pmod\'s '
        f"import extra), or a protobuf as new as sentencepiece's generated code."
    )


def test_the_eval_extra_leaves_torchvision_and_timm_working() -> None:
    """lmms-eval requires torchvision and timm; with the eval extra installed both must load (not be removed, nor be
    a build for another torch), or the Qwen-VL / OneVision processors and tests/test_backbone_cli.py are lost.
    torchvision's compiled operators must be registered: nms keeps boxes 0 and 2 (box 1 overlaps box 0)."""
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("the eval extra is not installed")
    for name in ("torchvision", "timm"):
        assert importlib.util.find_spec(name) is not None, (
            f"lmms-eval is installed but {name} is not: install the environment with the README's command "
            f"(torch and torchvision as a matching pair), nothing uninstalled"
        )
    import timm  # noqa: F401  # imports torchvision; a broken one broke `accelerate launch` through it
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert torchvision.ops.nms(boxes, scores, iou_threshold=0.5).tolist() == [0, 2]
