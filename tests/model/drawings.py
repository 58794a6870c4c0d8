"""Drawings made by the tests: QuickDraw bitmaps as the UI canvas sends them, and users' labelled
drawings as ``api.cli export-feedback`` writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.config import ModelSettings
from model.training.train_sketch import canvas_image, load_category
from tests.images import encode


def canvas_png(bitmap: np.ndarray) -> bytes:
    """A dataset drawing as the UI canvas sends it: 280x280, black strokes on white, RGBA PNG."""
    return encode(canvas_image(bitmap).convert("RGBA"), "PNG")


def feedback_folder(root: Path, model_settings: ModelSettings) -> tuple[Path, np.ndarray]:
    """``root/sketch``: two cat drawings, one drawing labelled with another model's label and one
    file that is no image; and the two cat bitmaps."""
    cats = load_category(model_settings.quickdraw_dir, "cat", 3000)[-2:]
    folder = root / "sketch"
    (folder / "cat").mkdir(parents=True)
    (folder / "zebra").mkdir()
    for i, bitmap in enumerate(cats):
        (folder / "cat" / f"{i}.png").write_bytes(canvas_png(bitmap))
    (folder / "cat" / "notes.txt").write_text("not a drawing")
    (folder / "zebra" / "z.png").write_bytes(canvas_png(cats[0]))
    return folder, cats
