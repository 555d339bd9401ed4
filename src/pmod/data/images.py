"""The one image opener of pmod: decode a file fully as RGB, or say what is wrong with it."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pmod.core.errors import UserError


class ImageError(UserError):
    """An image that does not exist or cannot be decoded."""


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image as RGB; :class:`ImageError` names the file and the fix otherwise."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise ImageError(f"image {path} does not exist; check the path.") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {path} cannot be read as an image ({err}); pass a PNG or JPEG file.") from err
