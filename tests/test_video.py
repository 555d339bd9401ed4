"""Reading videos for ``pmod generate --video``: evenly spread frames from a file (PyAV) or a folder of frames."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pmod.core.errors import UserError
from pmod.data.video import read_video_frames, spread

N = 10  # frames written; frame i is a flat grey of level 20 * i


def _grey(frame: Image.Image) -> float:
    return float(np.asarray(frame, dtype=np.float32).mean())


def test_spread() -> None:
    assert spread(10, 4) == [0, 2, 5, 7]
    assert spread(3, 8) == [0, 1, 2]


def test_video_file_gives_the_spread_frames(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(N):
            image = Image.new("RGB", (32, 32), (20 * i,) * 3)
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    frames = read_video_frames(path, max_frames=4)
    assert [f.size for f in frames] == [(32, 32)] * 4
    assert [_grey(f) for f in frames] == pytest.approx([20 * i for i in (0, 2, 5, 7)], abs=4)  # lossy codec
    assert len(read_video_frames(path, max_frames=32)) == N


def test_frame_folder(tmp_path: Path) -> None:
    for i in range(N):
        Image.new("RGB", (8, 8), (20 * i,) * 3).save(tmp_path / f"frame_{i:03d}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    frames = read_video_frames(tmp_path, max_frames=4)
    assert [_grey(f) for f in frames] == [20 * i for i in (0, 2, 5, 7)]


def test_video_mistakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(UserError, match="holds no"):
        read_video_frames(tmp_path)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV missing
    with pytest.raises(UserError, match=r"pip install 'pmod\[video\]'"):
        read_video_frames(broken)


def test_undecodable_file(tmp_path: Path) -> None:
    pytest.importorskip("av")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(UserError, match="cannot be decoded"):
        read_video_frames(broken)
