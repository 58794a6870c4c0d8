"""Turning uploaded bytes into model inputs, one function per registry ``preprocessing`` name.

Resize policy for photos: the whole upright image is resized (bilinear, antialiased) straight to
the model's input size, as Keras' own examples do with ``load_img(target_size=...)``; nothing is
cropped away, so an object near the border still counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from contracts.imaging import load_image
from contracts.registry import ModelEntry, Preprocessing

# QuickDraw bitmaps put the drawing's longer side across 26 of their 28 pixels, centred; with
# these values a dataset bitmap passes through almost unchanged (mean absolute change 0.002).
SKETCH_SIZE = 28
SKETCH_EXTENT = 26
SKETCH_INK_THRESHOLD = 10


def _photo(img: Image.Image, entry: ModelEntry) -> np.ndarray:
    size = (entry.input.width, entry.input.height)
    img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    return np.asarray(img, dtype=np.float32)


def _resnet50(img: Image.Image, entry: ModelEntry) -> np.ndarray:
    from keras.applications import resnet50

    return resnet50.preprocess_input(_photo(img, entry))


def _mobilenet_v2(img: Image.Image, entry: ModelEntry) -> np.ndarray:
    from keras.applications import mobilenet_v2

    return mobilenet_v2.preprocess_input(_photo(img, entry))


def _uint8(img: Image.Image, entry: ModelEntry) -> np.ndarray:
    return _photo(img, entry).astype(np.uint8)


@dataclass(frozen=True)
class SketchPlacement:
    """Where a drawing's strokes went: the crop of the image (``rows`` x ``cols``, pixels of the
    upright image) scaled to ``new_h`` x ``new_w`` and put at (``top``, ``left``) of the 28x28 input.
    The explainer maps heat back onto the image with it."""

    rows: tuple[int, int]
    """First and last-plus-one row of the crop."""
    cols: tuple[int, int]
    top: int
    left: int
    new_h: int
    new_w: int


def _ink(img: Image.Image) -> np.ndarray:
    """The drawing's greyscale pixels as ink on black (dark-on-light drawings inverted), 0-255."""
    arr = np.asarray(img.convert("L"), dtype=np.float32)
    return 255.0 - arr if arr.mean() > 127 else arr


def _placement(arr: np.ndarray) -> SketchPlacement | None:
    ink = arr > SKETCH_INK_THRESHOLD
    if not ink.any():
        return None
    rows, cols = np.where(ink.any(axis=1))[0], np.where(ink.any(axis=0))[0]
    h, w = int(rows[-1] + 1 - rows[0]), int(cols[-1] + 1 - cols[0])
    scale = SKETCH_EXTENT / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    return SketchPlacement(
        rows=(int(rows[0]), int(rows[-1] + 1)),
        cols=(int(cols[0]), int(cols[-1] + 1)),
        top=(SKETCH_SIZE - new_h) // 2,
        left=(SKETCH_SIZE - new_w) // 2,
        new_h=new_h,
        new_w=new_w,
    )


def sketch_placement(img: Image.Image) -> SketchPlacement | None:
    """Where ``sketch_array`` puts this drawing's strokes; None for an empty drawing."""
    return _placement(_ink(img))


def sketch_array(img: Image.Image) -> np.ndarray:
    """A drawing as the QuickDraw training data shows drawings: 28x28, white ink on black, in [0, 1].

    Dark-on-light drawings (a canvas) are inverted; the strokes are cropped, scaled so their
    longer side spans SKETCH_EXTENT pixels, centred, and the ink stretched to full intensity.
    """
    arr = _ink(img)
    place = _placement(arr)
    if place is None:
        return np.zeros((SKETCH_SIZE, SKETCH_SIZE, 1), dtype=np.float32)
    crop = arr[place.rows[0] : place.rows[1], place.cols[0] : place.cols[1]]
    small = Image.fromarray(crop.astype(np.uint8)).resize((place.new_w, place.new_h), Image.Resampling.BOX)
    out = np.zeros((SKETCH_SIZE, SKETCH_SIZE), dtype=np.float32)
    out[place.top : place.top + place.new_h, place.left : place.left + place.new_w] = np.asarray(
        small, dtype=np.float32
    )
    peak = out.max()
    if peak > 0:
        out = out * (255.0 / peak)
    return (out / 255.0)[..., None]


PREPROCESSORS: dict[Preprocessing, Callable[[Image.Image, ModelEntry], np.ndarray]] = {
    Preprocessing.resnet50: _resnet50,
    Preprocessing.mobilenet_v2: _mobilenet_v2,
    Preprocessing.uint8: _uint8,
    Preprocessing.sketch: lambda img, _entry: sketch_array(img),
}


def preprocess_image(img: Image.Image, entry: ModelEntry) -> np.ndarray:
    """A decoded image (in the entry's colour mode) as the model's input."""
    return PREPROCESSORS[entry.preprocessing](img, entry)


def preprocess(data: bytes, entry: ModelEntry) -> np.ndarray:
    """Uploaded bytes as the model's input. Photos let JPEG decode at a reduced scale; sketches are
    cropped to their strokes, so they decode in full."""
    size = (entry.input.width, entry.input.height)
    draft = None if entry.preprocessing == Preprocessing.sketch else size
    return preprocess_image(load_image(data, mode=entry.input.mode, draft_size=draft), entry)
