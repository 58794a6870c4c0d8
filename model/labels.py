"""Class labels, all read offline."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

IMAGENET_LABELS = Path(__file__).parent / "data" / "imagenet_labels.txt"


@lru_cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet labels in class-index order, as in Keras' ``imagenet_class_index.json``
    (e.g. ``Egyptian_cat``), read from ``model/data/imagenet_labels.txt`` (one per line)."""
    return file_labels(IMAGENET_LABELS)


def file_labels(path: Path) -> tuple[str, ...]:
    """The non-empty lines of a labels file, stripped, in file order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())
