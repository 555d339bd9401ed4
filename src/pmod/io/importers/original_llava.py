"""Import a checkpoint saved by the original LLaVA code base (LLaVA-1.5, LLaVA-NeXT) or by the p-MoD authors' fork
of it (p-MoD-LLaVA-v1.5 / -NeXT) as a Hugging Face LLaVA folder that pmod and transformers open::

    pmod.io.importers.original_llava.import_llava("p-MoD-LLaVA-NeXT-7B", "pmod-llava-next-7b")
    model = pmod.load("pmod-llava-next-7b")  # a p-MoD source; a plain one opens with from_pretrained

Tensors are renamed, never recomputed: each source tensor is written unchanged (in its dtype unless ``dtype`` says
otherwise), and the embedding and LM head only gain rows for the tokens the Hugging Face classes need (``<image>``,
``<pad>``). The import streams: one tensor is in memory at a time, and the destination appears only once complete.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from pmod.core.convert import convert, layer_ratios
from pmod.core.errors import UserError
from pmod.core.files import atomic_folder, check_new_folder
from pmod.io.importers.original_config import OriginalLlava, read_source
from pmod.io.importers.original_processor import IMAGE_TOKEN, Tower, build_processor, load_tokenizer, resolve_tower
from pmod.io.importers.tensor_files import OutputTensor, StoredTensor, TensorFolder, write_shards

TOWER = "model.vision_tower.vision_tower."
EMBED, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
#: New embedding rows are padded to a multiple of this, as transformers' own LLaVA conversion does.
PAD_VOCAB_TO = 64


def import_llava(
    src: str | Path,
    out: str | Path,
    vision_tower: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
) -> Path:
    """Turn an original LLaVA / p-MoD checkpoint folder ``src`` into a Hugging Face folder ``out``; returns ``out``.

    ``out`` holds a ``LlavaForConditionalGeneration`` (LLaVA-1.5) or ``LlavaNextForConditionalGeneration``
    (``image_aspect_ratio: anyres``) with its processor (tokenizer with ``<image>`` and ``<pad>`` added, image
    processor, Vicuna v1 chat template). A p-MoD source also gets its method config (the per-layer ratios the
    original code runs), so that ``pmod.load(out)`` opens it; a plain one opens with ``from_pretrained``.

    Args:
        src: the checkpoint folder (``config.json``, safetensors or ``pytorch_model*.bin`` shards, tokenizer).
        out: the folder to create; it must not exist (or be empty). A failed import leaves nothing there, and the
            staging folder a killed one left beside it (``.<out>.*.partial``) is removed by the next import.
        vision_tower: a local CLIP folder: the tower's weights when the checkpoint lacks them, its config and its
            image preprocessing. Without it the config and preprocessing of ``mm_vision_tower`` must be known
            (openai/clip-vit-large-patch14-336) and the weights in the checkpoint.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` to cast every floating tensor; None keeps each tensor's dtype.
        max_shard_bytes: the largest safetensors shard written.
        progress: show a progress bar while the weights are written.

    Raises:
        UserError: for a source that cannot be imported faithfully (unknown settings, projector or tower, missing
            or misshapen tensors), naming the key and what was expected.
    """
    src, out = Path(src), check_new_folder(out)  # before any work
    settings = read_source(src)
    out_dtype = _dtype(dtype)
    weights = TensorFolder.of_folder(src, "the checkpoint")
    tower = resolve_tower(
        settings,
        None if vision_tower is None else Path(vision_tower),
        any(k.startswith(TOWER) for k in weights.tensors),
    )
    tokenizer = load_tokenizer(src)
    embed = weights.tensors.get("model.embed_tokens.weight")
    if embed is None:
        raise UserError("the checkpoint has no model.embed_tokens.weight; pass a complete checkpoint (every shard).")
    model_dtype = out_dtype or embed.dtype
    config = hf_config(settings, tower, tokenizer, _vocab_rows(embed.shape[0], len(tokenizer), settings), model_dtype)
    model = _meta_model(config, settings)
    _check_routed_layers(weights, settings, model)
    sources = _sources(weights, tower, settings)
    plan = _plan(sources, model, out_dtype, model_dtype)
    processor = build_processor(settings, tower, tokenizer)
    with atomic_folder(out) as tmp:
        if progress:
            plan = _with_progress(plan)
        write_shards(tmp, plan, max_shard_bytes)
        model.config.save_pretrained(tmp)
        _generation_config(src, model.config).save_pretrained(tmp)
        processor.save_pretrained(tmp)
    weights.close()
    return out


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise UserError(f"unknown dtype {value!r}; choose bf16, fp16 or fp32 (or leave it out to keep the source's).")
    return DTYPES[value]


def _vocab_rows(rows: int, vocab: int, settings: OriginalLlava) -> int:
    """Rows of the imported embedding: the source's, or the tokenizer's (with the added tokens) rounded up to 64."""
    if settings.text["vocab_size"] != rows:
        raise UserError(
            f"config.json has vocab_size={settings.text['vocab_size']} but model.embed_tokens.weight has "
            f"{rows} rows; the config does not belong to these weights."
        )
    return rows if vocab <= rows else math.ceil(vocab / PAD_VOCAB_TO) * PAD_VOCAB_TO


def hf_config(settings: OriginalLlava, tower: Tower, tokenizer: Any, vocab_rows: int, dtype: torch.dtype) -> Any:
    """The ``LlavaConfig`` / ``LlavaNextConfig`` of the imported model."""
    text = transformers.LlamaConfig(
        **{**settings.text, "vocab_size": vocab_rows, "pad_token_id": tokenizer.pad_token_id}
    )
    common = dict(
        text_config=text,
        vision_config=tower.config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=settings.vision_feature_layer,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        projector_hidden_act="gelu",  # mlp2x_gelu: Linear, GELU (exact), Linear
        multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )
    if settings.anyres:
        config = transformers.LlavaNextConfig(**common, image_grid_pinpoints=settings.grid_pinpoints)
    else:
        patches = (tower.config.image_size // tower.config.patch_size) ** 2
        config = transformers.LlavaConfig(**common, image_seq_length=patches)
    config.architectures = [_model_class(settings).__name__]
    config.dtype = dtype
    config.imported_from = settings.original  # the source's multimodal and p-MoD settings, for the record
    return config


def _model_class(settings: OriginalLlava) -> type:
    return (
        transformers.LlavaNextForConditionalGeneration
        if settings.anyres
        else transformers.LlavaForConditionalGeneration
    )


def _meta_model(config: Any, settings: OriginalLlava) -> nn.Module:
    """The imported model without memory (meta tensors): the names and shapes every tensor must have. A p-MoD
    source is converted, which adds its routers and stores its method config in ``model.config``."""
    with torch.device("meta"):
        model = _model_class(settings)(config)
    if settings.pmod is not None:
        convert(model, settings.pmod)
    return model


def _check_routed_layers(weights: TensorFolder, settings: OriginalLlava, model: nn.Module) -> None:
    """The layers the checkpoint stores as routed (wrapped, with a router) must be the ones its config routes."""
    pattern = re.compile(r"model\.layers\.(\d+)\.(?:decoder_layer|router)\.")
    stored = sorted({int(m[1]) for key in weights.tensors if (m := pattern.match(key))})
    routed = [i for i, r in enumerate(layer_ratios(model)) if r is not None]
    if stored != routed:
        spec = settings.original.get("mod_target_layers")
        says = (
            f"mod_target_layers={spec!r} routes layers {routed}"
            if settings.pmod
            else f"model_type={settings.model_type!r} routes none"
        )
        raise UserError(
            f"the checkpoint stores layers {stored} as routed (model.layers.N.router.router.*) but "
            f"config.json's {says}; the config does not belong to these weights."
        )


def target_name(key: str) -> str | None:
    """The Hugging Face name of a tensor of the original checkpoint (None: a buffer transformers recomputes)."""
    if key.endswith((".rotary_emb.inv_freq", ".position_ids")):
        return None
    if key.startswith(TOWER):
        return "model.vision_tower." + key.removeprefix(TOWER).removeprefix("vision_model.")
    if key.startswith("model.mm_projector."):
        return "model.multi_modal_projector." + re.sub(
            r"^(\d+)\.", lambda m: f"linear_{int(m[1]) // 2 + 1}.", key.removeprefix("model.mm_projector.")
        )
    if key in ("model.image_newline", HEAD):
        return key
    # A routed layer of the p-MoD code wraps the decoder layer: layers.N.decoder_layer.*, layers.N.router.router.*
    key = re.sub(r"^model\.layers\.(\d+)\.(decoder_layer|router)\.", lambda m: f"model.layers.{m[1]}.", key)
    return "model.language_model." + key.removeprefix("model.") if key.startswith("model.") else key


def source_name(target: str, routed: set[int]) -> str:
    """The original checkpoint's name for a Hugging Face tensor name (for messages about missing tensors)."""
    if target.startswith("model.vision_tower."):
        return TOWER + "vision_model." + target.removeprefix("model.vision_tower.")
    if target.startswith("model.multi_modal_projector.linear_"):
        layer, rest = target.removeprefix("model.multi_modal_projector.linear_").split(".", 1)
        return f"model.mm_projector.{2 * (int(layer) - 1)}.{rest}"
    match = re.fullmatch(r"model\.language_model\.layers\.(\d+)\.(.+)", target)
    if match and int(match[1]) in routed:
        inner = (
            "router.router." + match[2].removeprefix("router.")
            if match[2].startswith("router.")
            else "decoder_layer." + match[2]
        )
        return f"model.layers.{match[1]}.{inner}"
    return target.replace("model.language_model.", "model.", 1)


def _tower_name(key: str) -> str | None:
    """The Hugging Face name of a tensor of a CLIP folder (a whole CLIP or a vision model); None: not the tower."""
    if key.endswith(".position_ids"):
        return None
    if key.startswith("vision_model."):
        return "model.vision_tower." + key.removeprefix("vision_model.")
    if key.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
        return "model.vision_tower." + key
    return None


@dataclass(frozen=True)
class Source:
    """Where a tensor of the imported model comes from."""

    folder: TensorFolder
    entry: StoredTensor
    shown: str  # its name as the user knows it
    in_checkpoint: bool  # False: from the --vision-tower folder


def _sources(weights: TensorFolder, tower: Tower, settings: OriginalLlava) -> dict[str, Source]:
    """Every Hugging Face tensor name and where its values come from."""
    found: dict[str, Source] = {}
    for key, entry in weights.tensors.items():
        name = target_name(key)
        if name == "model.image_newline" and not settings.anyres:
            continue  # saved by LLaVA-1.5 training, unused by its flat merge (transformers' conversion drops it too)
        if name is not None:
            found[name] = Source(weights, entry, key, True)
    if tower.folder is not None:
        clip = TensorFolder.of_folder(tower.folder, "the vision tower folder")
        for key, entry in clip.tensors.items():
            name = _tower_name(key)
            if name is not None:
                found[name] = Source(clip, entry, f"{key} of {tower.folder}", False)
    return found


def _plan(
    sources: dict[str, Source], model: nn.Module, out_dtype: torch.dtype | None, model_dtype: torch.dtype
) -> list[OutputTensor]:
    """Check that the sources are exactly the model's tensors, with its shapes, and say how to write each one."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop(HEAD, None)
    routed = {i for i, r in enumerate(layer_ratios(model)) if r is not None}
    extra = [source.shown for name, source in sources.items() if name not in expected]
    if extra:
        hint = " (a router of a layer mod_target_layers keeps dense?)" if ".router." in extra[0] else ""
        raise UserError(
            f"the checkpoint has tensor {extra[0]}{hint}, which the imported "
            f"{model.config.architectures[0]} has no place for; pmod imports LLaVA-1.5/NeXT and p-MoD "
            f"checkpoints of the LLaVA code base unchanged."
        )
    missing = [name for name in expected if name not in sources]
    if missing:
        why = f" (mod_target_layers routes layers {sorted(routed)})" if routed else ""
        raise UserError(
            f"the checkpoint has no tensor {source_name(missing[0], routed)}, expected with shape "
            f"{list(expected[missing[0]])}{why}; pass a complete checkpoint (every shard)."
        )
    plan = []
    # In file order, so that each shard is read front to back once.
    for name, source in sorted(sources.items(), key=lambda s: (str(s[1].entry.file), s[1].entry.offset)):
        entry, shape = source.entry, expected[name]
        rows_added = shape[0] - entry.shape[0] if name in (EMBED, HEAD) else 0
        if len(shape) != len(entry.shape) or rows_added < 0 or (shape[0] - rows_added, *shape[1:]) != entry.shape:
            raise UserError(
                f"{source.shown} has shape {list(entry.shape)} but the config gives {list(shape)}; the config "
                f"(or the vision tower) does not belong to these weights."
            )
        # Checkpoint tensors keep their dtype; a CLIP folder's (often fp32) take the model's, as the original runs it.
        dtype = out_dtype or (entry.dtype if source.in_checkpoint else model_dtype)
        if not entry.dtype.is_floating_point:
            dtype = entry.dtype
        plan.append(OutputTensor(name, shape, dtype, _maker(source.folder, entry.name, rows_added, dtype)))
    return plan


def _maker(folder: TensorFolder, key: str, rows_added: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        tensor = folder.read(key)
        if rows_added:
            # New token rows (<image>, <pad>, padding to 64) are the mean of the original rows: <image> is never
            # embedded (its positions take image features) and a mean LM-head row never beats the best real token.
            # Summed in float32 a block of rows at a time: no float32 copy of a 32000-row matrix.
            total = sum(block.float().sum(0) for block in tensor.split(4096))
            mean = (total / tensor.shape[0]).to(tensor.dtype)
            tensor = torch.cat([tensor, mean.expand(rows_added, -1)])
        return tensor.to(dtype)

    return make


def _with_progress(plan: list[OutputTensor]) -> list[OutputTensor]:
    from tqdm import tqdm

    bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="writing weights")

    def counted(t: OutputTensor) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            value = t.make()
            bar.update(t.nbytes)
            return value

        return make

    return [OutputTensor(t.name, t.shape, t.dtype, counted(t)) for t in plan]


def _generation_config(src: Path, config: Any) -> transformers.GenerationConfig:
    """The source's generation settings (if transformers still reads them) with the new pad token."""
    text = config.text_config
    try:
        generation = transformers.GenerationConfig.from_pretrained(src)
        generation.validate(strict=True)
    except (OSError, ValueError):
        generation = transformers.GenerationConfig()
    generation.bos_token_id, generation.eos_token_id = text.bos_token_id, text.eos_token_id
    generation.pad_token_id = text.pad_token_id
    return generation
