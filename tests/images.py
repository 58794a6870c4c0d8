"""Images made by the tests: every awkward format an upload can be."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def noise_png(seed: int | None = None, size: int = 64) -> bytes:
    """A PNG of random colours, ``size`` pixels a side; the same for the same seed, new each call without one."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), "PNG")


def split_colour(size: int = 64) -> Image.Image:
    """Left half red, right half blue: easy to check orientation and colour after conversion."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:, : size // 2] = (255, 0, 0)
    arr[:, size // 2 :] = (0, 0, 255)
    return Image.fromarray(arr)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header announcing width x height 1-bit pixels, with highly compressed rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg() -> bytes:
    """Stored turned 90 degrees counter-clockwise (red at the bottom) with EXIF orientation 6
    ("rotate 90 degrees clockwise to display"): shown upright it is red on the left again."""
    img = split_colour().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def sixteen_bit_png() -> bytes:
    arr = np.full((16, 16), 32768, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")
