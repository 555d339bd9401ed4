"""Reading a video as a list of frames: a video file (PyAV, an optional extra: ``pip install 'pmod[video]'``) or a
folder of frame images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pmod.core.errors import UserError

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def spread(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them if there are no more)."""
    if total <= count:
        return list(range(total))
    step = total / count
    return [int(i * step) for i in range(count)]


def read_video_frames(path: str | Path, max_frames: int = 32) -> list[Image.Image]:
    """Up to ``max_frames`` RGB frames spread evenly over a video file, or over the images of a folder (sorted by
    name). Only the chosen frames are kept in memory. A :class:`UserError` names what is wrong."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise UserError(f"frame folder {path} holds no {', '.join(FRAME_SUFFIXES)} images.")
        return [Image.open(files[i]).convert("RGB") for i in spread(len(files), max_frames)]
    if not path.is_file():
        raise UserError(f"video {path} does not exist; pass a video file or a folder of frame images.")
    try:
        import av
    except ImportError as err:
        raise UserError("reading a video file needs PyAV: pip install 'pmod[video]' (or pip install av)") from err
    try:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames  # 0 where the container does not say
        if not total:
            with av.open(str(path)) as container:
                total = sum(1 for _ in container.decode(video=0))
        wanted = set(spread(total, max_frames))
        with av.open(str(path)) as container:
            frames = [f.to_image().convert("RGB") for i, f in enumerate(container.decode(video=0)) if i in wanted]
    except (av.error.FFmpegError, ValueError, IndexError) as err:
        raise UserError(f"video {path} cannot be decoded ({err}); pass an MP4, WebM or AVI file.") from err
    if not frames:
        raise UserError(f"video {path} has no frames.")
    return frames
