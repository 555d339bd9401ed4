"""Tensor files read and written one tensor at a time, so that converting a checkpoint never holds a second copy of
the model in memory.

* :class:`TensorFolder` lists the tensors of a folder of safetensors or ``pytorch_model*.bin`` shards (names, shapes,
  dtypes) without reading them, and reads one on request.
* :func:`write_shards` writes safetensors shards (and their index) from a list of tensors produced on demand: each
  shard's header is written first, then each tensor's bytes as it is produced.

Safetensors files are read with plain ``seek``/``readinto`` rather than memory-mapped: a mapping counts the pages it
touched in the process's resident memory until it is closed, which would make a streamed import look (and, under
memory pressure, behave) like one that loads the whole shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pmod.core.errors import UserError
from pmod.core.weight_files import safetensors_header

#: safetensors dtype codes (the ones a LLaVA checkpoint can hold).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: its file, and for safetensors its byte offset and size."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0
    nbytes: int = 0

    @property
    def size_bytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class TensorFolder:
    """The tensors of a checkpoint folder (or of one weights file), read one at a time.

    ``.bin`` shards are opened memory-mapped (torch's zip format) one at a time; a legacy pickle shard is loaded whole
    while its tensors are read.
    """

    def __init__(self, files: list[Path]) -> None:
        self.tensors: dict[str, StoredTensor] = {}
        self._bin: tuple[Path, dict] | None = None
        for path in files:
            entries = self._list_safetensors(path) if path.suffix == ".safetensors" else self._list_bin(path)
            for entry in entries:
                self.tensors[entry.name] = entry

    @classmethod
    def of_folder(cls, folder: Path, what: str) -> TensorFolder:
        """The weights of ``folder``: a sharded index or a single file; safetensors preferred over ``.bin``."""
        for index in WEIGHT_INDEXES:
            if (folder / index).is_file():
                weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
                files = sorted({folder / name for name in weight_map.values()})
                missing = [p.name for p in files if not p.is_file()]
                if missing:
                    raise UserError(f"{folder}/{index} lists {missing[0]}, which is not in {folder}; download it too.")
                return cls(files)
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return cls([folder / name])
        raise UserError(
            f"{what} {folder} holds no weights (model.safetensors[.index.json] or pytorch_model[.bin.index.json]); "
            f"pass the folder the checkpoint was saved to."
        )

    def _list_safetensors(self, path: Path) -> list[StoredTensor]:
        start, header = safetensors_header(path)
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise UserError(f"{path}: tensor {name} has dtype {info['dtype']}, which pmod cannot import.")
            begin, end = info["data_offsets"]
            entries.append(
                StoredTensor(name, tuple(info["shape"]), DTYPES[info["dtype"]], path, start + begin, end - begin)
            )
        return entries

    def _list_bin(self, path: Path) -> list[StoredTensor]:
        state = self._load_bin(path)
        entries = [StoredTensor(k, tuple(v.shape), v.dtype, path) for k, v in state.items() if torch.is_tensor(v)]
        self._bin = None  # reopened when the tensors are read
        return entries

    def _load_bin(self, path: Path) -> dict:
        if self._bin is not None and self._bin[0] == path:
            return self._bin[1]
        self._bin = None  # release the previous shard before opening the next
        try:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be mapped: load it whole
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged or non-tensor file: whatever torch raises, the fix is the same
            raise UserError(f"cannot read {path} ({err}); re-download it.".replace("\n", " ")) from err
        self._bin = (path, state)
        return state

    def read(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype: read into memory of its own (safetensors), or a view of the
        memory-mapped shard (``.bin``)."""
        entry = self.tensors[name]
        if entry.file.suffix != ".safetensors":
            return self._load_bin(entry.file)[name]
        if entry.nbytes != entry.size_bytes:
            raise UserError(f"{entry.file}: tensor {name} has {entry.nbytes} bytes for shape {list(entry.shape)}.")
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            if entry.nbytes and f.readinto(memoryview(buffer.numpy())) != entry.nbytes:
                raise UserError(f"{entry.file} ends inside tensor {name}; the file is truncated, re-download it.")
        return buffer.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        self._bin = None


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: its name, shape and dtype up front (for the header), its values when ``make()`` is
    called."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _shard_groups(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    return groups


def _write_shard(path: Path, tensors: list[OutputTensor]) -> None:
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = t.make()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise RuntimeError(f"{t.name}: made {tuple(value.shape)} {value.dtype}, planned {t.shape} {t.dtype}")
            f.write(memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del value  # one tensor in memory at a time
        f.flush()
        os.fsync(f.fileno())


def write_shards(folder: Path, tensors: list[OutputTensor], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors`` or as ``model-0000i-of-0000n.safetensors`` shards with
    ``model.safetensors.index.json`` (the layout ``from_pretrained`` reads). Returns the shard paths."""
    groups = _shard_groups(tensors, max_shard_bytes)
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        _write_shard(folder / name, group)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, group in zip(names, groups) for t in group},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [folder / name for name in names]
