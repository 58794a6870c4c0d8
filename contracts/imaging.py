"""How both services read an uploaded image, so that they agree on what it is.

The API uses it to validate uploads and draw previews, the model service to build model inputs.
"""

from __future__ import annotations

import ctypes
import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""The largest upload the API accepts unless MAX_UPLOAD_BYTES says otherwise (the UI reads the
same setting, so its uploader states the real limit)."""
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
"""The most pixels (width x height) of an image the API accepts unless MAX_IMAGE_PIXELS says
otherwise (the UI reads the same setting before it draws a preview)."""
UPLOAD_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "gif", "bmp", "webp", "tif", "tiff")
"""File name endings of the accepted formats (MPO files end in .jpg)."""
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "WEBP", "TIFF"})
"""What Pillow names the formats accepted. MPO is a JPEG with more pictures after the first (many
cameras and phones write it); it is read, stored and served as the JPEG it is."""
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
MAX_JPEG_SCANS = 100
"""The most scans a JPEG may have; one with more is refused (422) before it is decoded.

A progressive JPEG is its pixels in a series of scans, each refining the last, and decoding it
reads every scan over the whole picture: a few bytes of scan cost a pass over every block.
``python -m bench.jpeg_scans`` on a 2-core AVX2 EPYC: a 7000x7000 JPEG of 10 scans decodes in
0.2-0.4 s, of 100 in 0.7-0.8 s and of 1,000 (266 KB) in 5-5.7 s, whole or at 1/8 scale, grey or
colour: about 5 ms a scan, so a 10 MiB file of repeated scans would take minutes. libjpeg-turbo
leaves the limit to its caller (``djpeg -maxscans``, TurboJPEG's ``TJPARAM_SCANLIMIT``; its
fuzzers use 500), and Pillow sets none. Encoders write one scan (baseline) or about ten
(progressive; a few dozen from unusual ones)."""

# Pillow's own bomb guard is replaced by an explicit check against the configured limit.
Image.MAX_IMAGE_PIXELS = None

_ORIENTATION = 0x0112
# EXIF Orientation to the transpose that makes the picture upright (as ImageOps.exif_transpose).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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
    """Upright size, in pixels."""
    preview: bytes | None = None
    """A JPEG of the upright image at most ``preview_size`` pixels a side, when one was asked for and
    the image is larger and not a baseline JPEG. A baseline JPEG is decoded at a reduced scale
    whenever it is drawn, in milliseconds; a progressive one reads all its scans at any scale (a
    second or more for a large one of many), so it gets a preview like the other formats."""
    stats: PixelStats | None = None
    """Simple statistics of its pixels, which the drift monitor compares over time."""


STATS_SIZE = 64
"""Side of the thumbnail the pixel statistics are computed on: they describe the whole picture,
and a thumbnail costs microseconds where millions of pixels would cost milliseconds."""


@dataclass(frozen=True)
class PixelStats:
    """What a picture looks like, in numbers a drift monitor can bin (all in [0, 1])."""

    brightness: float
    """Mean luma (ITU-R 601), 0 black, 1 white."""
    contrast: float
    """Standard deviation of luma."""
    colourfulness: float
    """Mean absolute difference between the colour channels; about 0 for a greyscale picture."""

    @classmethod
    def of(cls, img: Image.Image) -> PixelStats:
        small = img.copy()
        small.thumbnail((STATS_SIZE, STATS_SIZE))
        rgb = np.asarray(small.convert("RGB"), dtype=np.float32) / 255.0
        luma = np.asarray(small.convert("L"), dtype=np.float32) / 255.0
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        colour = (np.abs(r - g) + np.abs(g - b) + np.abs(b - r)) / 3.0
        return cls(
            brightness=round(float(luma.mean()), 4),
            contrast=round(float(luma.std()), 4),
            colourfulness=round(float(colour.mean()), 4),
        )


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
"""The first bytes of each supported format (their specifications' magic numbers; BMP's two
letters "BM" are too common a start to tell)."""


def _signature(data: bytes) -> str | None:
    """The supported format ``data`` starts as, by its magic number; None for none of them."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


NOT_SUPPORTED = f"The file is not an image in a supported format ({', '.join(sorted(SUPPORTED_FORMATS - {'MPO'}))})."
"""Why a file Pillow cannot identify as a supported format is refused."""
HEAD_BYTES = 16
"""Bytes at the start of a file that Pillow's ``Image.open`` identifies its format by."""


def may_be_image(head: bytes) -> bool:
    """Whether a file starting with ``head`` (its first HEAD_BYTES bytes) can be a supported image:
    Pillow's own test of each format's first bytes, so a file that fails it is refused (415) by
    ``inspect_image`` too, whatever follows. Lets a reader skip such a file without reading the rest."""
    Image.init()  # every plugin, as Image.open loads them when the first few do not know a file
    for fmt in SUPPORTED_FORMATS:
        registered = Image.OPEN.get(fmt)
        if registered is None:  # MPO is opened by JPEG's plugin
            continue
        _factory, accept = registered
        if accept is None or accept(head):
            return True
    return False


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageRejected(415, "The file is empty; upload an image.")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if (looks_like := _signature(data)) is not None:
            raise ImageRejected(
                422, f"The file starts as a {looks_like} does but cannot be read; it is truncated or corrupt."
            ) from None
        raise ImageRejected(415, NOT_SUPPORTED) from None
    if img.format not in SUPPORTED_FORMATS:
        raise ImageRejected(415, f"Image format {img.format} is not supported.")
    return img


@contextmanager
def _classified() -> Iterator[None]:
    """Turns whatever Pillow raises on bad bytes into ImageRejected.

    Pillow's decoders and metadata parsers raise OSError, SyntaxError, ValueError, EOFError,
    TypeError, struct.error, IndexError and more on truncated or malformed files; every one of them
    is the file's fault, never an outage of ours, so all of them are 422.
    """
    try:
        yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, f"The image is too large to decode: {exc}") from None
    except ValueError as exc:
        if "MAX_TEXT_" not in str(exc):  # MAX_TEXT_CHUNK, MAX_TEXT_MEMORY
            raise ImageRejected(
                422, f"The image cannot be read; it is truncated or corrupt ({_reason(exc)})."
            ) from None
        # Pillow's own limit on a PNG's compressed metadata (an ICC profile, a text chunk): the
        # picture may be fine, but its metadata decompresses past what is read safely.
        raise ImageRejected(
            422,
            "The image's embedded metadata (an ICC colour profile or a text chunk) is larger than is read "
            "safely; save it again without it.",
        ) from None
    except Exception as exc:
        raise ImageRejected(422, f"The image cannot be read; it is truncated or corrupt ({_reason(exc)}).") from None


def _reason(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _orientation(img: Image.Image) -> int:
    """The EXIF Orientation (1-8), 1 when absent or unreadable: a malformed EXIF block elsewhere
    (a GPS entry of the wrong type, say) must not cost the picture its rotation.

    Only for an image already loaded: a PNG's ``getexif`` loads the pixels, and a decoding error
    there would be taken for an unreadable EXIF block."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF Orientation says. Unlike ``ImageOps.exif_transpose`` this does
    not rewrite the EXIF block, which fails on blocks Pillow cannot serialise."""
    method = _TRANSPOSE.get(_orientation(img))
    return img.transpose(method) if method is not None else img


def inspect_image(data: bytes, *, max_pixels: int, preview_size: int | None = None) -> ImageInfo:
    """Checks that ``data`` is an image every model can be given: decoded completely, turned
    upright and converted to RGB exactly as ``load_image`` does for the workers. Returns its
    format and upright size, and a preview (see ``ImageInfo.preview``) drawn from the pixels this
    check decoded anyway; raises ImageRejected with 413 (too many pixels), 415 (not an image of a
    supported format) or 422 (truncated or corrupt at any step, or a JPEG of more than
    ``MAX_JPEG_SCANS`` scans).

    The size check reads only the header, so a decompression bomb is refused before any pixel
    buffer is allocated, and a JPEG of too many scans before any is decoded; JPEGs are decoded at
    1/8 scale, which reads every byte all the same.
    """
    with _classified():
        img = _open(data)
        _check_pixels(img, max_pixels)
        _check_scans(img, data)
        width, height = img.size  # before ``draft`` shrinks a JPEG's
        fmt = "JPEG" if img.format in _JPEG_FORMATS else str(img.format)
        # Decoded before the orientation is read, as ``load_image`` does: reading a PNG's EXIF loads
        # its pixels, and ``_orientation`` would swallow a decoding error that a second load, finding
        # nothing left to decode, would then leave unsaid (a corrupt PNG taken, to fail in a worker).
        side = preview_size if preview_size is not None and max(width, height) > preview_size else None
        if fmt == "JPEG" and not img.info.get("progressive"):
            side = None  # drawn at a reduced scale, in milliseconds, whenever it is shown
        draft = (max(1, width // 8), max(1, height // 8))
        if side is not None and fmt == "JPEG":
            # Pixels enough for the preview: a progressive JPEG costs about the same at 1/2 as at 1/8.
            longest = max(width, height)
            draft = (-(-width * side // longest), -(-height * side // longest))
        upright = _prepare(img, mode="RGB", draft_size=draft)
        # Pillow reports a TIFF's size upright already (and turns its pixels as it loads them).
        turned = _orientation(img) in (5, 6, 7, 8) and fmt != "TIFF"
        w, h = (height, width) if turned else (width, height)
        stats = PixelStats.of(upright)
        preview = None
        if side is not None:
            upright.thumbnail((side, side))
            buf = io.BytesIO()
            upright.save(buf, format="JPEG", quality=90)
            preview = buf.getvalue()
        return ImageInfo(format=fmt, width=w, height=h, preview=preview, stats=stats)


_BAND_ROWS = 256


def _bands(img: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """Each band of ``_BAND_ROWS`` rows of ``img`` with its first row, as an array of its own: a
    whole 50-megapixel image as one array would take 200 MB (32-bit) per upload on top of the
    decoded pixels."""
    for top in range(0, img.height, _BAND_ROWS):
        yield top, np.asarray(img.crop((0, top, img.width, min(top + _BAND_ROWS, img.height))))


def _scale_to_8bit(img: Image.Image) -> float:
    """What a value of ``img`` (mode ``I;16*``, ``I`` or ``F``) is divided by to read as 0-255.

    16-bit images use their full range (65535 → 255). A 32-bit integer (``I``) or floating-point
    (``F``) image says nothing of its range: TIFF writers store 8-bit, 16-bit and 0-1 data in
    them alike. So it is read in the smallest usual range that holds its largest value: 0-1 for
    floats up to 1.0, then 0-255, then 0-65535, then its own largest finite value (NaN reads as
    black). Values below 0 read as black, and data of other widths (12-bit in 0-4095, say) reads
    darker than it would in a viewer that stretches each image to its own range.
    """
    if img.mode.startswith("I;16"):
        return 257.0
    top = 0.0
    for _, band in _bands(img):
        top = max(top, float(np.max(band, where=np.isfinite(band), initial=0.0)))
    if img.mode == "F" and top <= 1.0:
        return 1.0 / 255.0
    if top <= 255.0:
        return 1.0
    if top <= 65535.0:
        return 257.0
    return top / 255.0


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and floating-point greyscale scaled to 8 bits (``_scale_to_8bit``),
    a band of rows at a time (``_bands``); Pillow's own convert would clip 16-bit images to white
    and read 0-1 floats as black."""
    divisor = _scale_to_8bit(img)
    out = np.empty((img.height, img.width), dtype=np.uint8)
    for top, band in _bands(img):
        scaled = np.nan_to_num(band.astype(np.float32) / divisor, nan=0.0)
        out[top : top + band.shape[0]] = np.clip(scaled, 0, 255).round()
    return Image.fromarray(out)


def _prepare(img: Image.Image, *, mode: str, draft_size: tuple[int, int] | None) -> Image.Image:
    img.seek(0)
    if draft_size is not None and img.format in _JPEG_FORMATS:
        img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, draft_size)
    img.load()
    img = _upright(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode not in ("RGB", "L", "1"):
        # CMYK, YCbCr, LAB, HSV...: Pillow turns each into RGB, not always into L directly.
        img = img.convert("RGB")
    return img.convert(mode)


def load_image(
    data: bytes, *, mode: str = "RGB", draft_size: tuple[int, int] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decodes ``data`` into an upright ``mode`` ("RGB" or "L") image; raises ImageRejected as
    ``inspect_image`` does, with 413 before decoding when it has more than ``max_pixels`` pixels
    (None: not checked; the workers get only images the API checked) and 422 before decoding a
    JPEG of more than ``MAX_JPEG_SCANS`` scans (always checked: it reads only the markers).

    First frame of an animation; EXIF orientation applied; transparency composited over white
    (a transparent sketch is dark strokes on white paper); CMYK, palette and 16-bit converted.
    ``draft_size`` lets JPEG decode at a reduced scale when the model input is small.
    """
    with _classified():
        img = _open(data)
        _check_pixels(img, max_pixels)
        _check_scans(img, data)
        return _prepare(img, mode=mode, draft_size=draft_size)


_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
"""The next marker, past any entropy-coded data or junk before it: within entropy-coded data a
0xFF is followed by 0x00 (a stuffed byte) or a restart marker (RST0-7), and 0xFF 0xFF is fill;
libjpeg skips what it finds between segments to the next marker just so."""
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
"""Marker codes without a length (TEM, RST0-7, SOI)."""
_WALK_SEGMENTS = 1_000
"""Segments walked one by one (a JPEG has a few dozen), so that a file of tiny segments costs a
bounded Python loop; past them the scans left are counted as their markers' bytes (an upper bound:
a scan always starts with them)."""


def _jpeg_scans(data: bytes) -> int:
    """The scans (SOS markers) of JPEG ``data``'s first picture, counting at most to one past
    ``MAX_JPEG_SCANS``. Walked segment by segment up to the picture's end (EOI), so that neither an
    EXIF thumbnail (inside APP1) nor what follows the picture (an MPO's other pictures, a phone's
    motion-photo video) counts; each search runs at C speed over the bytes it skips."""
    scans = 0
    pos = 2  # past SOI
    for _ in range(_WALK_SEGMENTS):
        found = _MARKER.search(data, pos)
        if found is None:
            return scans
        code, pos = data[found.start() + 1], found.start() + 2
        if code == 0xD9:  # EOI
            return scans
        if code == 0xDA:  # SOS
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return scans
        if code not in _STANDALONE:
            pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans + data.count(b"\xff\xda", pos)


def _check_scans(img: Image.Image, data: bytes) -> None:
    """422 when ``img`` (opened from ``data``) is a JPEG of more than ``MAX_JPEG_SCANS`` scans:
    decoding reads every scan, at 1/8 scale too (see ``MAX_JPEG_SCANS``)."""
    if img.format in _JPEG_FORMATS and _jpeg_scans(data) > MAX_JPEG_SCANS:
        raise ImageRejected(
            422,
            f"The JPEG has more than {MAX_JPEG_SCANS} scans (passes over its pixels, which a progressive JPEG "
            f"has about ten of); at most {MAX_JPEG_SCANS} are accepted. Save it again.",
        )


def _check_pixels(img: Image.Image, max_pixels: int | None) -> None:
    """413 when ``img`` (opened: only its header read) has more than ``max_pixels`` pixels."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageRejected(413, f"The image is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted.")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast(Callable[[int], int], ctypes.CDLL("libc.so.6").malloc_trim)
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hands the heap pages this process freed back to the system (glibc's ``malloc_trim``, in
    every thread's arena); glibc otherwise keeps them for reuse, per thread. No-op elsewhere."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
