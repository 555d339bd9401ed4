"""The parts of an imported LLaVA model that are not the language model's weights: the CLIP vision tower (its config
and where its weights come from), the image processor, and the tokenizer with the tokens the Hugging Face LLaVA
classes need.

The original LLaVA code base loads the tower from ``mm_vision_tower`` (a hub name or a path) at run time and keeps
the image preprocessing in its own code; the tokenizer is the base LLM's sentencepiece tokenizer, without an image
token. Hugging Face LLaVA keeps all of that in the model folder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from transformers import AddedToken, CLIPVisionConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from pmod.core.errors import UserError
from pmod.data.tokenizer import VICUNA_CHAT_TEMPLATE, image_processor_class
from pmod.io.importers.original_config import OriginalLlava
from pmod.io.importers.tensor_files import WEIGHT_FILES, WEIGHT_INDEXES

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"

#: Vision towers whose config pmod knows without a local copy (the weights must then be in the checkpoint).
_CLIP_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
}
#: OpenAI CLIP's preprocessing (preprocessor_config.json of openai/clip-vit-large-patch14-336), at the tower's size.
CLIP_PREPROCESSING: dict[str, Any] = dict(
    do_resize=True,
    resample=3,
    do_center_crop=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=list(OPENAI_CLIP_MEAN),
    image_std=list(OPENAI_CLIP_STD),
    do_convert_rgb=True,
)
WEIGHT_NAMES = WEIGHT_INDEXES + WEIGHT_FILES
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclass(frozen=True)
class Tower:
    """The vision tower: its config, its preprocessing and, when not in the checkpoint, the folder of its weights."""

    config: CLIPVisionConfig
    preprocessing: dict[str, Any]
    folder: Path | None


def _known(name: str) -> dict[str, Any] | None:
    return KNOWN_TOWERS.get(Path(name.rstrip("/")).name)


def resolve_tower(settings: OriginalLlava, vision_tower: Path | None, weights_in_checkpoint: bool) -> Tower:
    """The tower's config and preprocessing: from ``vision_tower`` (or ``mm_vision_tower`` when it is a local
    folder), else from the known settings of ``mm_vision_tower``; weights from the checkpoint when it has them."""
    name = settings.vision_tower
    folder = vision_tower
    if folder is not None and not (folder / "config.json").is_file():
        raise UserError(
            f"--vision-tower {folder} has no config.json; pass a local CLIP folder (e.g. a download of {name})."
        )
    if folder is None and (Path(name) / "config.json").is_file():
        folder = Path(name)
    if folder is not None:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type not in ("clip", "clip_vision_model"):
            raise UserError(
                f"{folder} holds a {model_type} model; the LLaVA code base's tower is a CLIP vision model, "
                f"pass a CLIP folder as --vision-tower."
            )
        config = CLIPVisionConfig.from_pretrained(folder)
    elif _known(name) is not None:
        config = CLIPVisionConfig(**_known(name))
    else:
        raise UserError(
            f"config.json names the vision tower {name!r}, which is neither a local folder nor a tower "
            f"pmod knows; pass --vision-tower DIR, a local copy of {name}."
        )
    if settings.mm_hidden_size is not None and settings.mm_hidden_size != config.hidden_size:
        raise UserError(
            f"config.json has mm_hidden_size={settings.mm_hidden_size} but the vision tower's hidden size "
            f"is {config.hidden_size}; pass the tower the model was trained with as --vision-tower."
        )
    if not weights_in_checkpoint and (folder is None or not any((folder / f).is_file() for f in WEIGHT_NAMES)):
        also = f" and {folder} holds none" if folder is not None else ""
        raise UserError(
            f"the checkpoint has no vision tower weights (model.vision_tower.vision_tower.*){also}; pass "
            f"--vision-tower DIR, a local copy of {name} (config.json and weights)."
        )
    return Tower(config, _preprocessing(name, folder, config.image_size), None if weights_in_checkpoint else folder)


def _preprocessing(name: str, folder: Path | None, image_size: int) -> dict[str, Any]:
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        stored = json.loads((folder / "preprocessor_config.json").read_text())
        settings = {k: stored[k] for k in CLIP_PREPROCESSING if k in stored}
        size, crop = stored.get("size", image_size), stored.get("crop_size", image_size)
        settings["size"] = {"shortest_edge": size} if isinstance(size, int) else size
        settings["crop_size"] = {"height": crop, "width": crop} if isinstance(crop, int) else crop
        return settings
    if _known(name) is None and folder is not None:
        raise UserError(
            f"{folder} has no preprocessor_config.json and {name!r} is not a tower whose preprocessing "
            f"pmod knows; copy the tower's preprocessor_config.json into {folder}."
        )
    size = {"shortest_edge": image_size}
    return {**CLIP_PREPROCESSING, "size": size, "crop_size": {"height": image_size, "width": image_size}}


def image_processor(settings: OriginalLlava, tower: Tower) -> Any:
    """LLaVA-NeXT: anyres tiles over ``image_grid_pinpoints``; LLaVA-1.5: the CLIP preprocessing, after padding to a
    square with the mean colour for ``image_aspect_ratio: pad`` (the original's ``expand2square``)."""
    if settings.anyres:
        return image_processor_class("LlavaNextImageProcessor")(
            **tower.preprocessing, image_grid_pinpoints=settings.grid_pinpoints, do_pad=True
        )
    return image_processor_class("LlavaImageProcessor")(**tower.preprocessing, do_pad=settings.pad_to_square)


def load_tokenizer(src: Path) -> Any:
    """The checkpoint's tokenizer with ``<image>`` added (and ``<pad>`` when it has none, or pads with ``<unk>``), as
    transformers' own LLaVA conversion adds them; the original ids are unchanged."""
    files = [src / name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not any(p.name in ("tokenizer.json", "tokenizer.model") for p in files):
        raise UserError(
            f"{src} has no tokenizer (tokenizer.model or tokenizer.json); copy the base LLM's tokenizer "
            f"files (e.g. those of lmsys/vicuna-7b-v1.5) into it."
        )
    if not (src / "tokenizer.json").is_file():
        check_sentencepiece(src)
    with tempfile.TemporaryDirectory() as tmp:
        # Only the tokenizer files: the checkpoint's config.json names a model type transformers does not know.
        for path in files:
            shutil.copy(path, tmp)
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tmp)
        except Exception as err:  # transformers raises many kinds here; all mean the same to the user
            reason = str(err).replace("\n", " ")
            raise UserError(
                f"cannot load the tokenizer of {src} ({reason}); copy the base LLM's tokenizer files "
                f"(e.g. those of lmsys/vicuna-7b-v1.5) into it."
            ) from err
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def check_sentencepiece(src: Path) -> None:
    """transformers converts a ``tokenizer.model`` through sentencepiece's generated protobuf code; when that code
    cannot load it falls back to reading the file as tiktoken's and fails with an unrelated parse error, so the
    real cause is named here: no sentencepiece, or one whose generated code is newer than the protobuf runtime."""
    fix = 'pip install "sentencepiece<0.2.3" protobuf (pmod\'s import extra)'
    if importlib.util.find_spec("sentencepiece") is None:
        raise UserError(
            f"{src} has a sentencepiece tokenizer.model only; {fix}, so that transformers can convert it "
            f"(the imported folder will not need it)."
        )
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except Exception as err:  # protobuf's VersionError (gencode newer than the runtime), or a broken install
        found = re.search(r"gencode \S+ runtime \S+?(?=\.?\s|$)", str(err))
        reason = found.group(0) if found else str(err).splitlines()[0]
        raise UserError(
            f"{src} has a sentencepiece tokenizer.model only, and the installed sentencepiece cannot read it with "
            f"the installed protobuf ({reason}); {fix}, or a protobuf as new as sentencepiece's generated code."
        ) from err


def build_processor(settings: OriginalLlava, tower: Tower, tokenizer: Any) -> Any:
    """The ``LlavaProcessor`` / ``LlavaNextProcessor`` with the Vicuna v1 chat template the original models use."""
    cls = transformers.LlavaNextProcessor if settings.anyres else transformers.LlavaProcessor
    return cls(
        image_processor=image_processor(settings, tower),
        tokenizer=tokenizer,
        patch_size=tower.config.patch_size,
        vision_feature_select_strategy=settings.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=VICUNA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )
