"""``python -m model.training.held_out [--model sketch@3] [--sheet misses.png]``: how a trained
sketch version answers its held-out drawings, and which ones its top three answers miss.

It scores the version's model file on the held-out tenth of QUICKDRAW_DIR that training never saw
(``train_sketch.split`` with ``train_sketch.SEED``, as ``train`` cut it) and prints top-1, top-3
and top-5 accuracy, the rank the true class got in each drawing the top three miss, and those
misses per class. ``--sheet`` draws the misses on one PNG (black on white, the true category and
the model's first answer under each), to look at what the figures count: QuickDraw's bitmap
files keep the drawings the game did not recognise, so some held-out drawings show no subject.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from model.config import ModelSettings
from model.prepare import DEFAULT_CATEGORIES, training_entry
from model.runtimes import ModelUnavailable, configure_tensorflow, keras_model
from model.training import train_sketch

TILE = 84
"""Side of one drawing on the sheet, in pixels (28x28 bitmaps scaled three times)."""
CAPTION = 24
"""Height of the two caption lines under each drawing, in pixels."""
COLUMNS = 12


def ranks(probabilities: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The rank of the true class among each row's answers, 0 for the first; probabilities
    (n, classes), truth (n,) class indices."""
    order = np.argsort(-probabilities, axis=1)
    return (order == truth[:, None]).argmax(axis=1)


def sheet(bitmaps: np.ndarray, truth: list[str], answered: list[str]) -> Image.Image:
    """The drawings (n, 28, 28), white on black as stored, drawn black on white in rows of
    ``COLUMNS``, each captioned with its true category and the model's first answer."""
    rows = max(1, math.ceil(len(bitmaps) / COLUMNS))
    image = Image.new("L", (COLUMNS * TILE, rows * (TILE + CAPTION)), 255)
    draw = ImageDraw.Draw(image)
    for k, (bitmap, true, first) in enumerate(zip(bitmaps, truth, answered, strict=True)):
        row, column = divmod(k, COLUMNS)
        x, y = column * TILE, row * (TILE + CAPTION)
        image.paste(Image.fromarray(255 - bitmap).resize((TILE, TILE)), (x, y))
        draw.text((x + 2, y + TILE), true[:13], fill=0)
        draw.text((x + 2, y + TILE + 11), f"> {first[:11]}", fill=0)
    return image


def evaluate(model: Any, bitmaps: np.ndarray, truth: np.ndarray, categories: list[str]) -> dict[str, Any]:
    """Top-1, top-3 and top-5 accuracy of ``model`` on ``bitmaps`` (n, 28, 28) with class indices
    ``truth``, the ranks of the true class in the top-3 misses (rank 4 first) and those misses per
    category, with the misses' indices into ``bitmaps`` and the model's first answer to each."""
    probabilities = model.predict(train_sketch.normalise(bitmaps), batch_size=512, verbose=0)
    rank = ranks(probabilities, truth)
    missed = np.flatnonzero(rank >= 3)
    return {
        "drawings": len(truth),
        "top_1": float((rank < 1).mean()),
        "top_3": float((rank < 3).mean()),
        "top_5": float((rank < 5).mean()),
        "missed_ranks": {int(r) + 1: int(n) for r, n in enumerate(np.bincount(rank[missed])) if n},
        "missed_per_category": {c: int((truth[missed] == i).sum()) for i, c in enumerate(categories)},
        "missed": missed.tolist(),
        "first_answers": [categories[int(i)] for i in probabilities[missed].argmax(axis=1)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.training.held_out", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sketch@3", help="a registry version with training options")
    parser.add_argument("--sheet", type=Path, help="write the top-3 misses to this PNG")
    args = parser.parse_args(argv)
    settings = ModelSettings()
    configure_tensorflow(settings)
    entry = training_entry(args.model, settings)
    options = entry.training or {}
    categories = str(options.get("categories", DEFAULT_CATEGORIES)).split(",")
    per_category = int(options.get("per_category", 3000))
    try:
        model, _ = keras_model(entry, settings)
    except ModelUnavailable as exc:  # not trained here yet: python -m model.prepare makes it
        raise SystemExit(f"{entry.key}: {exc}") from None
    bitmaps, y, _, _, held_out = train_sketch.load_split(settings.quickdraw_dir, categories, per_category)
    result = evaluate(model, bitmaps[held_out], y[held_out], categories)
    print(f"{entry.key}: {result['drawings']} held-out drawings of {len(categories)} categories")
    for k in (1, 3, 5):
        print(f"top-{k}: {result[f'top_{k}']:.2%}")
    print(f"missed by the top three: {len(result['missed'])}; rank of the true class in them:")
    print("  " + ", ".join(f"{rank}: {n}" for rank, n in result["missed_ranks"].items()))
    print("  per category: " + ", ".join(f"{c} {n}" for c, n in result["missed_per_category"].items()))
    if args.sheet is not None:
        truth = [categories[int(i)] for i in y[held_out][result["missed"]]]
        sheet(bitmaps[held_out][result["missed"]], truth, result["first_answers"]).save(args.sheet)
        print(f"the {len(result['missed'])} drawings: {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
