"""``python -m model.prepare``: make every served model loadable before the workers start.

Trains each registry model that has ``training`` options and no model file yet. External
weights are not fetched here: Keras downloads ImageNet weights itself on first load when
allowed, and a missing file is reported by the worker as the model's unavailability reason.
"""

from __future__ import annotations

import logging
import sys

from contracts.registry import load_registry
from model.config import get_model_settings
from model.training.train_sketch import train

log = logging.getLogger("model.prepare")


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
        options = dict(entry.training)
        log.info("%s: training into %s with %s (data: %s)", entry.key, path.parent, options, settings.quickdraw_dir)
        metrics = train(
            data=settings.quickdraw_dir,
            categories=options.pop("categories", "apple,bicycle,cat,diamond,eye,fish").split(","),
            out=path.parent,
            **options,
        )
        log.info("%s: held-out accuracy %.4f", entry.key, metrics["test_accuracy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
