"""``python -m model.prepare``: make every served model loadable before the workers start.

Trains each registry model that has ``training`` options and no model file yet. A model trained
before with the same options, trainer code and data is copied from TRAINING_CACHE_DIR instead
(training takes minutes on two cores). External weights are not fetched here: Keras downloads
ImageNet weights itself on first load when allowed, and a missing file is reported by the worker
as the model's unavailability reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from contracts.registry import load_registry
from model import preprocessing
from model.config import ModelSettings, get_model_settings
from model.training import train_sketch

log = logging.getLogger("model.prepare")
DEFAULT_CATEGORIES = "apple,bicycle,cat,diamond,eye,fish"


def training_key(options: dict[str, Any], categories: list[str], data: Path) -> str:
    """Changes whenever the result of training could change."""
    digest = hashlib.sha256(json.dumps({**options, "categories": categories}, sort_keys=True).encode())
    for module in (train_sketch, preprocessing):
        digest.update(Path(module.__file__ or "").read_bytes())
    for category in categories:
        path = data / f"{category}.npy"
        digest.update(f"{category}:{path.stat().st_size if path.exists() else 'download'}".encode())
    return digest.hexdigest()[:16]


def prepare_trained(key: str, options: dict[str, Any], out: Path, settings: ModelSettings) -> None:
    options = dict(options)
    categories = str(options.pop("categories", DEFAULT_CATEGORIES)).split(",")
    cached = settings.training_cache_dir / training_key(options, categories, settings.quickdraw_dir)
    if (cached / "model.keras").exists():
        shutil.copytree(cached, out, dirs_exist_ok=True)
        log.info("%s: copied from the training cache %s", key, cached)
        return
    log.info("%s: training into %s with %s (data: %s)", key, out, options, settings.quickdraw_dir)
    metrics = train_sketch.train(data=settings.quickdraw_dir, categories=categories, out=out, **options)
    log.info("%s: held-out accuracy %.4f in %.0f s", key, metrics["test_accuracy"], metrics["seconds"])
    try:
        tmp = cached.with_name(cached.name + ".tmp")
        shutil.copytree(out, tmp, dirs_exist_ok=True)
        tmp.replace(cached)
    except OSError as exc:  # a read-only cache only costs the next run a retraining
        log.warning("could not keep %s in the training cache: %s", key, exc)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = get_model_settings()
    registry = load_registry(settings.registry_path)
    for entry in registry.served(benchmark_mode=settings.benchmark_mode):
        if not entry.training or entry.file is None:
            continue
        path = entry.resolve(entry.file, models_dir=settings.models_dir, trained_dir=settings.trained_dir)
        if path.exists():
            log.info("%s: %s present", entry.key, path)
            continue
        prepare_trained(entry.key, entry.training, path.parent, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
