"""The weight files of a saved model folder, checked cheaply before anything loads them.

A ``model.safetensors`` cut short (a killed copy, a partial download) makes ``from_pretrained`` fail deep inside
safetensors with a message that names no file. :func:`check_weight_files` reads only each file's header and size:
a safetensors header says exactly how many data bytes follow it, so a file of any other size is truncated or
corrupt. No tensor is read, and neither torch nor transformers is imported.

:func:`unusable_weights` checks the values once a model is in memory: a diverged run's weights (non-finite, or so
large that the forward overflows) must be neither saved as a checkpoint nor scored.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

#: What ``from_pretrained`` looks for, in its order: one safetensors file, a sharded index, then the ``.bin`` forms.
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_NAMES = (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX)
#: A safetensors header larger than this is not a header (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
#: The largest weight magnitude a usable model holds: the square root of float32's largest value. A larger weight
#: overflows the first square it enters (a norm's variance, an attention score) in float32 and bfloat16 alike, so the
#: forward degenerates (hidden states normed to zero, equal or NaN log-likelihoods); trained networks stay many orders
#: of magnitude below it (LLM weights are O(1)).
MAX_WEIGHT = math.sqrt(float.fromhex("0x1.fffffep+127"))


class CorruptWeightFile(UserError):
    """A weight file that is truncated or corrupt; ``path`` and ``detail`` say which and how."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(f"{path} is truncated or corrupt ({detail}); re-save or re-download it.")
        self.path, self.detail = Path(path), detail


def corrupt(path: Path, detail: str) -> CorruptWeightFile:
    """The one-line error for a damaged weight file."""
    return CorruptWeightFile(path, detail)


def safetensors_header(path: str | Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the JSON header) of a safetensors file, checked against the file's size: the
    header's largest data offset must end exactly at the end of the file, as safetensors itself requires."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise corrupt(path, f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise corrupt(path, f"its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise corrupt(path, f"its header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise corrupt(path, "its header is not a JSON object")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise corrupt(path, f"a tensor entry of its header has no data_offsets ({err})") from err
    if 8 + length + end != size:
        raise corrupt(path, f"its header describes {8 + length + end} bytes, the file has {size}")
    return 8 + length, header


def _check_bin(path: Path) -> None:
    # torch.save writes a zip archive, whose directory is at the end: a cut file has none. A legacy (pickle)
    # file cannot be checked without reading it all, so it is left to torch.
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip and not zipfile.is_zipfile(path):
        raise corrupt(path, "a zip archive without its central directory")


def check_weight_file(path: str | Path) -> None:
    """Check one weight file (a safetensors header against the file's size; a torch zip's central directory); a
    :class:`UserError` names it when it is truncated or corrupt. Other files pass."""
    path = Path(path)
    if path.suffix == ".safetensors":
        safetensors_header(path)
    elif path.suffix == ".bin":
        _check_bin(path)


def check_weight_files(folder: str | Path, required: bool = True) -> list[Path]:
    """Check the weight files ``from_pretrained`` would read from ``folder`` (headers and sizes only); returns them.

    A :class:`UserError` names a truncated or corrupt file, a shard an index lists but the folder lacks, or (with
    ``required``) a folder without weights.
    """
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
                files = [folder / shard for shard in sorted(set(weight_map.values()))]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise corrupt(path, f"no readable weight_map: {err}") from err
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise UserError(f"{path} lists {missing[0]}, which is not in {folder}; re-save or re-download it.")
        else:
            files = [path]
        for file in files:
            check_weight_file(file)
        return files
    if required:
        raise UserError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_NAMES)}); pass a folder "
                        f"written completely by save_pretrained.")  # fmt: skip
    return []


def unusable_weights(model: nn.Module) -> list[tuple[str, float]]:
    """Every parameter (of those this process holds) with a non-finite value or one beyond :data:`MAX_WEIGHT`, with
    its largest magnitude (NaN or inf when non-finite), in the model's order; empty when every weight is usable.
    One host sync for the whole model, not one per parameter."""
    import torch

    names, peaks = [], []
    for name, param in model.named_parameters():
        t = getattr(param, "ds_tensor", param)  # DeepSpeed ZeRO-3 keeps this rank's partition there
        t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard
        if t.numel() and t.is_floating_point():
            names.append(name)
            peaks.append(torch.linalg.vector_norm(t.detach(), ord=math.inf).float())  # NaN stays NaN
    if not peaks:
        return []
    peak = torch.stack([p.to(peaks[0].device) for p in peaks]).cpu()
    bad = (~torch.isfinite(peak) | (peak > MAX_WEIGHT)).nonzero().flatten().tolist()
    return [(names[i], float(peak[i])) for i in bad]
