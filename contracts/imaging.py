"""How both services read an uploaded image, so that they agree on what it is.

The API uses it to validate uploads and draw previews, the model service to build model inputs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"})

# Pillow's own bomb guard is replaced by an explicit check against the configured limit.
Image.MAX_IMAGE_PIXELS = None


class ImageRejected(Exception):
    """The bytes are not an acceptable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageRejected(415, "The file is empty; upload an image.")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected(
            415,
            "The file is not an image in a supported format " f"({', '.join(sorted(SUPPORTED_FORMATS))}).",
        ) from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageRejected(415, f"Image format {img.format} is not supported.")
    return img


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Checks that ``data`` decodes completely; raises ImageRejected with 413, 415 or 422.

    The size check reads only the header, so a decompression bomb is refused before any pixel
    buffer is allocated.
    """
    img = _open(data)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(
            413,
            f"The image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted.",
        )
    try:
        img.seek(0)
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(422, f"The image is truncated or corrupt: {exc}") from None
    w, h = _oriented_size(img, width, height)
    return ImageInfo(format=str(img.format), width=w, height=h)


def _oriented_size(img: Image.Image, width: int, height: int) -> tuple[int, int]:
    orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits; Pillow's own convert would clip it to white."""
    arr = np.asarray(img.convert("I"), dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def load_image(data: bytes, *, mode: str = "RGB", draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decodes ``data`` into an upright ``mode`` ("RGB" or "L") image.

    First frame of an animation; EXIF orientation applied; transparency composited over white
    (a transparent sketch is dark strokes on white paper); CMYK, palette and 16-bit converted.
    ``draft_size`` lets JPEG decode at a reduced scale when the model input is small.
    """
    img = _open(data)
    img.seek(0)
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, draft_size)
    img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        img = _to_8bit(img)
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)
