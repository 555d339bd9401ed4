"""Tests written to kill the mutants that survived the rest of the suite in ``pmod.core``'s model plumbing and
files: ``backbone``, ``convert`` (load, record_routing), ``recording``, ``files`` and ``weight_files`` (see
``benchmarks/mutation/run_mutation.py`` and ``benchmarks/results/mutation.json``). Expected values are written out by
hand or taken from transformers' own behaviour, never from the code under test."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import pmod
from pmod.core.backbone import (
    BackboneAdapter,
    UnsupportedModelError,
    backbone_for,
    backbone_for_model_type,
    language_model,
    register_backbone,
    text_decoder,
)
from pmod.core.errors import UserError
from pmod.core.files import (
    INCOMPLETE_NAME,
    LOCK_NAME,
    OutputLock,
    atomic_folder,
    atomic_write_json,
    atomic_write_text,
    check_complete,
    check_new_folder,
    check_output_folder,
    remove_stale_partials,
)
from pmod.core.recording import RoutingRecord
from pmod.core.weight_files import (
    MAX_WEIGHT,
    CorruptWeightFile,
    check_weight_file,
    check_weight_files,
    safetensors_header,
    unusable_weights,
)
from pmod.testing import tiny_llama, tiny_llava

NO_ROUTED_LAYER = "no layer of this model is routed"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A routed, a dense-settings and a never converted tiny Llama (3 layers), saved."""
    root = tmp_path_factory.mktemp("saved")
    tiny_llama(num_layers=3).save_pretrained(root / "plain")
    pmod.convert(tiny_llama(num_layers=3)).save_pretrained(root / "routed")
    dense = pmod.PModConfig(schedule="explicit", ratios=[None, None, None])
    pmod.convert(tiny_llama(num_layers=3), dense).save_pretrained(root / "dense")
    return {"routed": root / "routed", "dense": root / "dense", "plain": root / "plain"}


# ------------------------------------------------------------------------------------------------------ backbone
def test_decoders_of_models_with_and_without_a_head() -> None:
    llava = tiny_llava()
    inner = llava.model.language_model
    assert language_model(llava) is inner  # model.model.language_model
    assert language_model(llava.model) is inner  # a LlavaModel: no head, no .model
    assert backbone_for(llava.model).decoder_layers(llava.model) is inner.layers
    llama = tiny_llama(num_layers=2)
    assert language_model(llama) is llama.model  # no language_model: the inner model itself
    assert text_decoder(llama) is llama.model  # a head: model.model
    assert text_decoder(llama.model) is llama.model  # a bare LlamaModel has no .model
    assert text_decoder(llava) is llava  # its .model has no .layers: not a text model's decoder


def test_registering_an_adapter_again_keeps_it() -> None:
    adapter = backbone_for_model_type("llama")
    assert adapter is not None and register_backbone(adapter) is adapter
    assert backbone_for_model_type("llama") is adapter


def test_an_unsupported_model_is_named_with_its_model_type() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(UnsupportedModelError) as err:
        backbone_for(model)
    assert str(err.value).startswith("pmod does not support GPT2LMHeadModel (model type 'gpt2'). Supported model "
                                     "types: ")  # fmt: skip


def test_an_adapter_shared_by_configs_with_and_without_video() -> None:
    from transformers import LlavaConfig

    adapter = BackboneAdapter(
        name="llava-like", model_types=("llava",), decoder=language_model,
        routable_token_keys=("image_token_id", "video_token_id"),
    )  # fmt: skip
    assert adapter.routable_token_ids(LlavaConfig(image_token_id=7)) == [7]  # LlavaConfig has no video_token_id


# ----------------------------------------------------------------------------------------------------- recording
def test_a_record_keeps_none_for_a_method_without_weights() -> None:
    record = RoutingRecord()
    mask = torch.tensor([[True, False]])
    record(3, mask, None)
    record(3, mask, torch.tensor([[0.5, 0.25]], dtype=torch.float16))
    assert record.weights[3][0] is None
    assert record.weights[3][1].dtype == torch.float32 and record.weights[3][1].tolist() == [[0.5, 0.25]]
    assert [m.tolist() for m in record.processed[3]] == [[[True, False]], [[True, False]]]


def test_record_routing_of_a_dense_model_says_what_to_do() -> None:
    with pytest.raises(ValueError) as err:
        pmod.record_routing(tiny_llama(num_layers=2)).__enter__()
    assert str(err.value) == "record_routing needs a routed model; convert it with pmod.convert(model) first."


# ---------------------------------------------------------------------------------------------------------- load
def _with_config(saved_folder: Path, tmp_path: Path, **changes: object) -> Path:
    folder = tmp_path / "changed"
    folder.mkdir()
    for file in saved_folder.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("changes", "shown"), [
    ({"architectures": None}, "[]"),
    ({"architectures": ["NoSuchModelForCausalLM"]}, "['NoSuchModelForCausalLM']"),
])  # fmt: skip
def test_an_unknown_architecture_is_one_line(saved, tmp_path, changes, shown) -> None:
    folder = _with_config(saved["routed"], tmp_path, **changes)
    with pytest.raises(UserError) as err:
        pmod.load(folder)
    assert str(err.value).startswith(f"{folder} has architecture {shown} (model type 'llama'); pmod supports the "
                                     "model types ")  # fmt: skip


def test_load_passes_keywords_on_as_from_pretrained_does(saved) -> None:
    with pytest.raises(TypeError) as plain:
        LlamaForCausalLM.from_pretrained(saved["routed"], bogus_option=1)
    with pytest.raises(TypeError) as routed:
        pmod.load(saved["routed"], bogus_option=1)
    with pytest.raises(TypeError) as unconverted:  # a folder without method settings: from_pretrained itself
        pmod.load(saved["plain"], bogus_option=1)
    assert "unexpected keyword argument 'bogus_option'" in str(plain.value)
    assert str(routed.value) == str(unconverted.value) == str(plain.value)


def test_load_warns_only_when_no_layer_is_routed(saved, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pmod.core.convert"):
        assert pmod.layer_ratios(pmod.load(saved["routed"])) == [None, 0.5, 0.15]
        assert not [r for r in caplog.records if r.name == "pmod.core.convert"]
        assert not pmod.is_routed_model(pmod.load(saved["dense"]))
    lines = [r.getMessage() for r in caplog.records if r.name == "pmod.core.convert"]
    assert lines == [f"{NO_ROUTED_LAYER} ({saved['dense']}: its pmod settings leave every layer dense); it runs as "
                     "the dense model."]  # fmt: skip


# --------------------------------------------------------------------------------------------------------- files
def test_json_is_written_with_two_space_indent_and_the_callers_options(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"b": [1], "a": "é"}, sort_keys=True, ensure_ascii=False)
    assert path.read_bytes() == '{\n  "a": "é",\n  "b": [\n    1\n  ]\n}\n'.encode()


@pytest.fixture
def ascii_locale() -> Iterator[None]:
    """The C locale's ASCII as the default encoding, as under a non-UTF-8 locale (Python's UTF-8 mode aside)."""
    import locale

    if sys.flags.utf8_mode:
        pytest.skip("Python's UTF-8 mode makes every default encoding UTF-8")
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert locale.getencoding() != "UTF-8"
        yield
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_pmods_own_files_are_utf8_whatever_the_locale(tmp_path: Path, ascii_locale: None) -> None:
    atomic_write_text(tmp_path / "notes.txt", "modèle")
    assert (tmp_path / "notes.txt").read_bytes() == "modèle".encode()
    (tmp_path / INCOMPLETE_NAME).write_bytes("Relancez pmod train --resume (modèle).".encode())
    with pytest.raises(UserError, match=r"\. Relancez pmod train --resume \(modèle\)\.$"):
        check_complete(tmp_path)
    save_file({"w": torch.zeros(2)}, tmp_path / "model-1.safetensors")
    index = {"metadata": {"note": "modèle"}, "weight_map": {"w": "model-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_bytes(json.dumps(index, ensure_ascii=False).encode())
    assert check_weight_files(tmp_path) == [tmp_path / "model-1.safetensors"]


def test_output_folders_are_created_with_their_parents_and_probed_where_they_are(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b" / "c"
    assert check_output_folder(nested) == nested and nested.is_dir()
    assert list(nested.iterdir()) == []  # the probe file is gone
    # os.access says root may write /proc, but no file can be made there: only a probe inside the folder tells.
    if Path("/proc/self").is_dir():
        with pytest.raises(UserError, match=r"^--out /proc cannot be written \("):
            check_output_folder("/proc")


def test_a_new_folder_must_be_empty_unless_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError) as err:
        check_new_folder(tmp_path)
    assert str(err.value) == f"{tmp_path} already exists and is not empty; pass a new folder or remove it first."
    assert check_new_folder(tmp_path, replace=True) == tmp_path


def test_an_incomplete_save_whose_marker_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / INCOMPLETE_NAME).write_text("Run  pmod train\n--resume.")
    with pytest.raises(UserError) as err:
        check_complete(tmp_path)
    assert str(err.value).endswith(f"interrupted ({INCOMPLETE_NAME}). Run pmod train --resume.")

    def unreadable(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(UserError) as err:
        check_complete(tmp_path)
    assert str(err.value) == f"{tmp_path} holds an incomplete model: its save was interrupted ({INCOMPLETE_NAME}). "


def test_a_staging_name_on_a_link_never_deletes_what_it_points_to(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "data.txt").write_text("user data")
    (tmp_path / ".model.abc.partial").symlink_to(kept, target_is_directory=True)
    remove_stale_partials(tmp_path / "model")  # rmtree refuses a link; the run goes on
    assert (kept / "data.txt").read_text() == "user data"


def _hold(folder: Path, content: bytes) -> int:
    """A lock file held by a writer that wrote ``content`` (another open file description: flock conflicts)."""
    import fcntl

    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, content)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize(("content", "holder"), [
    (b"", "another process"),  # the holder has not written its name yet
    (b"pmod \xff train", "pmod \ufffd train"),  # not UTF-8: still one line
    (b"x" * 300, "x" * 200),  # a holder's text is read up to 200 bytes
])  # fmt: skip
def test_the_busy_line_names_the_holder(tmp_path: Path, content: bytes, holder: str) -> None:
    fd = _hold(tmp_path, content)
    try:
        with pytest.raises(UserError) as err:
            OutputLock(tmp_path, "pmod eval").__enter__()
    finally:
        os.close(fd)
    assert str(err.value) == f"--out {tmp_path} is in use by {holder}; wait for it to finish or pass another --out."


def test_the_lock_file_is_private_to_its_writer_and_released_once(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        first = OutputLock(tmp_path, "first")
        with first:
            assert (tmp_path / LOCK_NAME).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old_umask)
    with OutputLock(tmp_path, "second"):
        first.__exit__(None, None, None)  # a second exit of the finished run touches nothing
        assert (tmp_path / LOCK_NAME).read_text() == f"second (pid {os.getpid()})"


def test_a_lock_file_removed_between_open_and_flock_is_not_the_one_locked(tmp_path, monkeypatch) -> None:
    import fcntl

    real, calls = fcntl.flock, []

    def flock_after_the_holder_left(fd: int, operation: int) -> None:
        if not calls:  # the previous holder finished (removing its lock file) after our open, before our flock
            os.unlink(tmp_path / LOCK_NAME)
        calls.append(fd)
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_left)
    with OutputLock(tmp_path, "late"):
        assert len(calls) == 2  # it saw the file it locked was gone and locked the new one
        assert (tmp_path / LOCK_NAME).read_text() == f"late (pid {os.getpid()})"


def test_a_run_that_replaces_its_locked_folder_ends_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with OutputLock(out, "pmod demo"):
        with atomic_folder(out, replace=True) as staging:  # the old folder, lock file and all, is swapped out
            (staging / "result.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["result.json"]


def test_without_fcntl_the_lock_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: ``import fcntl`` fails
    folder = tmp_path / "out"
    with OutputLock(folder, "pmod train") as lock:
        assert lock.folder == folder
    assert not folder.exists()


# -------------------------------------------------------------------------------------------------- weight_files
def test_a_legacy_pickle_bin_is_left_to_torch(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    check_weight_file(path)  # not a zip: nothing to check cheaply, so no error


def test_a_safetensors_file_without_tensors_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({}, path, metadata={"format": "pt"})
    # 8 length bytes + the 32-byte header {"__metadata__":{"format":"pt"}} and no data: the header ends the file.
    assert path.stat().st_size == 40
    assert safetensors_header(path) == (40, {"__metadata__": {"format": "pt"}})
    check_weight_file(path)


@pytest.mark.parametrize("excess", [1, 4, 8])
def test_a_header_longer_than_the_file_is_named(tmp_path: Path, excess: int) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    data = path.read_bytes()
    claimed = len(data) - 8 + excess  # past the end of the file by ``excess`` bytes
    path.write_bytes(struct.pack("<Q", claimed) + data[8:])
    with pytest.raises(CorruptWeightFile) as err:
        safetensors_header(path)
    assert err.value.detail == f"its header claims {claimed} bytes, the file has {len(data)}"


def test_a_header_length_with_the_top_bit_set_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])  # 2**64 - 1 as the unsigned length the format stores
    with pytest.raises(CorruptWeightFile) as err:
        safetensors_header(path)
    assert err.value.detail == f"its header claims {2**64 - 1} bytes, the file has {len(data)}"


def test_unusable_weights_edge_cases() -> None:
    one = torch.nn.Linear(2, 1, bias=False)  # one parameter only
    with torch.no_grad():
        one.weight[0, 0] = float("nan")
    assert [name for name, _ in unusable_weights(one)] == ["weight"]
    # A weight exactly at MAX_WEIGHT (in float32) is usable; the next float32 up is not.
    at = torch.tensor(MAX_WEIGHT, dtype=torch.float32)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(at)
        model.bias.fill_(torch.nextafter(at, torch.tensor(math.inf)))
    assert [name for name, _ in unusable_weights(model)] == ["bias"]
    # Empty and integer parameters have no magnitude to check.
    odd = torch.nn.Module()
    odd.empty = torch.nn.Parameter(torch.empty(0))
    odd.counts = torch.nn.Parameter(torch.tensor([2**40]), requires_grad=False)
    assert unusable_weights(odd) == []


def test_unusable_weights_read_a_deepspeed_partition() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    # ZeRO-3 empties param.data and keeps this rank's partition in param.ds_tensor.
    model.weight.data = torch.empty(0)
    model.weight.ds_tensor = torch.tensor([1.0, 3e30])
    assert unusable_weights(model) == [("weight", pytest.approx(3e30))]


def test_unusable_weights_read_an_fsdp2_shard() -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = torch.nn.Linear(2, 2)
        weight = torch.tensor([[1.0, 3e30], [0.0, 1.0]])
        model.weight = torch.nn.Parameter(distribute_tensor(weight, DeviceMesh("cpu", [0]), [Shard(0)]))
        assert unusable_weights(model) == [("weight", pytest.approx(3e30))]
    finally:
        dist.destroy_process_group()
