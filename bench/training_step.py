"""How long one training step of a sketch version takes here, in float32 and in bfloat16.

``python -m bench.training_step [--model sketch@3] [--steps 20]`` builds the network of the
version's registry ``training`` options (``model.training.train_sketch.build_model``, augmentation
included), trains it on random drawings at the recipe's batch size after one warm-up step, and
prints the median milliseconds per step under Keras' ``float32`` and ``mixed_bfloat16`` policies,
with whether this CPU computes bfloat16 in hardware (``train_sketch.native_bfloat16``). It tells
whether the recipe's ``mixed_precision`` pays off on a host: ``train`` takes bfloat16 only where
the CPU has it, and an epoch is the step time times its steps (``python -m model.prepare`` logs
those).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from model.config import ModelSettings
from model.prepare import DEFAULT_CATEGORIES, training_entry
from model.runtimes import configure_tensorflow
from model.training import train_sketch

POLICIES = ("float32", "mixed_bfloat16")


def step_ms(options: dict[str, Any], classes: int, policy: str, steps: int) -> float:
    """Median wall time (ms) of ``steps`` training steps under ``policy``, after one warm-up step."""
    import keras

    batch = int(options.get("batch_size", 128))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = train_sketch.build_model(
            str(options.get("arch", "compact")),
            classes,
            **{k: v for k, v in options.items() if k in train_sketch.TRAINING_OPTIONS},
        )
    finally:
        keras.mixed_precision.set_global_policy(previous)
    rng = np.random.default_rng(0)
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, classes, batch)
    y = np.eye(classes, dtype=np.float32)[labels] if options.get("label_smoothing") else labels
    model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.training_step", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sketch@3", help="a registry version with training options")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    settings = ModelSettings()
    configure_tensorflow(settings)
    entry = training_entry(args.model, settings)
    options = dict(entry.training or {})
    classes = len(str(options.get("categories", DEFAULT_CATEGORIES)).split(","))
    print(f"{entry.key}: {options.get('arch')} at batch {options.get('batch_size')}, {classes} classes")
    print(f"bfloat16 in hardware: {train_sketch.native_bfloat16()}")
    for policy in POLICIES:
        print(f"{policy}: {step_ms(options, classes, policy, args.steps):.0f} ms per step")


if __name__ == "__main__":
    main()
