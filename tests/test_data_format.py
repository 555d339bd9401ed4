"""LLaVA-format parsing and `pmod data check`: each kind of broken record is found, with its index and id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pmod.cli import main
from pmod.data.llava_format import LlavaFormatError, Turn, check_records, load_records, parse_record


def _conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": f, "value": v} for f, v in turns]


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(folder / "b.png")
    (folder / "garbage.png").write_bytes(b"this is not an image")
    good = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])  # valid header, cut pixel data


QA = (("human", "<image>\nWhat is it?"), ("gpt", "red"))
BROKEN = [
    {"id": "ok-image", "image": "a.png", "conversations": _conv(*QA)},
    {"id": "ok-text", "conversations": _conv(("human", "Hi"), ("gpt", "yes"), ("user", "More"), ("assistant", "no"))},
    {"id": "missing", "image": "nope.png", "conversations": _conv(*QA)},
    {"id": "garbage", "image": "garbage.png", "conversations": _conv(*QA)},
    {"id": "no-gpt", "conversations": _conv(("human", "Hi"))},
    {"id": "two-humans", "conversations": _conv(("human", "Hi"), ("human", "Hi"), ("gpt", "yes"))},
    {"id": "no-token", "image": "a.png", "conversations": _conv(("human", "What is it?"), ("gpt", "red"))},
    {"id": "two-images", "image": ["a.png", "b.png"], "conversations": _conv(*QA)},
    {"id": "no-conversations", "image": "a.png"},
    {"id": "ok-middle", "image": ["a.png", "b.png"], "conversations": _conv(("human", "<image>=<image>?"), QA[1])},
    {"id": "gpt-first", "conversations": _conv(("gpt", "yes"), ("human", "Hi"))},
    {"id": "token-in-reply", "image": "a.png", "conversations": _conv(QA[0], ("gpt", "<image> red"))},
    {"id": "truncated", "image": "truncated.png", "conversations": _conv(*QA)},
    ["not", "a", "record"],
    {"id": "ok-system", "conversations": _conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "yes"))},
]
EXPECTED = [
    (2, "missing_image"),
    (3, "unreadable_image"),
    (4, "no_assistant_turn"),
    (5, "roles_not_alternating"),
    (6, "image_token_mismatch"),
    (7, "image_token_mismatch"),
    (8, "bad_structure"),
    (10, "roles_not_alternating"),
    (11, "image_token_mismatch"),
    (12, "unreadable_image"),
    (13, "bad_structure"),
]


@pytest.fixture
def broken_json(tmp_path: Path) -> Path:
    _images(tmp_path / "img")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(BROKEN, indent=2))
    return path


def test_each_problem_kind_found(broken_json: Path) -> None:
    report = check_records(broken_json, broken_json.parent / "img")
    assert [(p.index, p.kind) for p in report.problems] == EXPECTED
    assert [p.id for p in report.problems][:3] == ["missing", "garbage", "no-gpt"]
    assert report.problems[-1].id is None  # not an object: no id to give
    assert (report.n_records, report.n_with_images, report.n_text_only) == (15, 8, 5)
    assert not report.ok and report.kinds()["image_token_mismatch"] == 3
    assert "record 7 (id two-images): image_token_mismatch: 1 <image> tokens but 2 images" in report.format()


def test_check_without_decoding(broken_json: Path) -> None:
    report = check_records(broken_json, broken_json.parent / "img", decode_images=False)
    assert [(p.index, p.kind) for p in report.problems] == EXPECTED  # PIL's verify() also sees the cut file


def test_jsonl_reports_lines(tmp_path: Path) -> None:
    _images(tmp_path)
    good = json.dumps({"id": "g", "image": "a.png", "conversations": _conv(*QA)})
    lost = json.dumps({"id": "lost", "image": "zz.png", "conversations": _conv(*QA)})
    path = tmp_path / "data.jsonl"
    path.write_text(f'{good}\n{{"id": "x", "conversations": [\n\n{lost}\n{good}\n')
    report = check_records(path)  # image folder defaults to the file's folder
    assert [(p.index, p.line, p.kind, p.id) for p in report.problems] == [
        (1, 2, "malformed_json", None),
        (2, 4, "missing_image", "lost"),
    ]
    assert report.n_records == 4
    with pytest.raises(LlavaFormatError, match="line 2"):
        load_records(path)
    assert [r["id"] for r in load_records(path, skip_malformed=True)] == ["g", "lost", "g"]


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(LlavaFormatError, match="no such file"):
        check_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": 1,}]')
    with pytest.raises(LlavaFormatError, match="not valid JSON"):
        check_records(bad)
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(LlavaFormatError, match="expected a JSON list"):
        load_records(tmp_path / "text.txt")


def test_parse_record_normalises() -> None:
    record, problems = parse_record(
        {"id": 5, "image": "x.png", "conversations": _conv(("system", "S"), ("Human", "<image> q"), ("gpt", "a"))}
    )
    assert problems == [] and record is not None
    assert record.id == "5" and record.images == ("x.png",) and record.system == "S"
    assert record.dialogue == (Turn("user", "<image> q"), Turn("assistant", "a"))
    record, problems = parse_record({"conversations": _conv(("human", "q"), ("robot", "a"))}, index=3)
    assert record is None and [(p.index, p.kind) for p in problems] == [(3, "bad_structure")]


def test_cli_check(broken_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(broken_json.parent / "img")
    assert main(["data", "check", str(broken_json), "--image-folder", folder]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "15 records (8 with images, 5 text-only), 11 problems in 11 records" in out[0]
    assert "record 2 (id missing): missing_image:" in out[1]
    assert len(out) == 1 + len(EXPECTED)
    assert main(["data", "check", str(broken_json), "--image-folder", folder, "--max-problems", "2"]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "  ... and 9 more"

    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(BROKEN[:2]))
    assert main(["data", "check", str(clean), "--image-folder", folder]) == 0
    assert "0 problems" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["data", "check", str(clean), "--image-folder", str(tmp_path / "nowhere")]) == 2
    assert main(["data"]) == 2
