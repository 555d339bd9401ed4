"""Reading a video file as a list of frames (PyAV, an optional extra: ``pip install 'pmod[video]'``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pmod.core.errors import UserError


def read_video_frames(path: str | Path, max_frames: int = 32) -> list[Image.Image]:
    """Up to ``max_frames`` RGB frames spread evenly over the video; a :class:`UserError` names what is wrong."""
    try:
        import av
    except ImportError as err:
        raise UserError("reading a video needs PyAV: pip install 'pmod[video]' (or pip install av)") from err
    if not Path(path).is_file():
        raise UserError(f"video {path} does not exist; check the path.")
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise UserError(f"video {path} cannot be decoded ({err}); pass an MP4, WebM or AVI file.") from err
    if not frames:
        raise UserError(f"video {path} has no frames.")
    if len(frames) <= max_frames:
        return frames
    step = len(frames) / max_frames
    return [frames[int(i * step)] for i in range(max_frames)]
