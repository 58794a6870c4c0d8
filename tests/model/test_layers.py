"""Horizontal-flip test-time augmentation inside the sketch CNN, its saving, and its Grad-CAM."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from contracts.registry import Registry
from model.config import ModelSettings
from tests.support import ROOT

CLASSES = 5


def pair(seed: int = 3) -> tuple[Any, Any]:
    """A plain VGG sketch CNN with random weights, and the same weights with the mirror images read."""
    import keras

    from model.training.train_sketch import build_model

    keras.utils.set_random_seed(seed)
    plain = build_model("vgg", CLASSES, augment=True, flip_only=True)
    mirrored = build_model("vgg", CLASSES, augment=True, flip_only=True, flip_average=True)
    # Random batch statistics, so the map differs from place to place as a trained one does.
    weights = [w if w.ndim > 1 else np.random.default_rng(seed).uniform(0.5, 1.5, w.shape) for w in plain.get_weights()]
    plain.set_weights(weights)
    mirrored.set_weights(weights)
    return plain, mirrored


def drawings(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.random((n, 28, 28, 1)) > 0.8).astype(np.float32)


def logits(model: Any, x: np.ndarray) -> np.ndarray:
    import keras

    features = keras.Model(model.inputs, model.layers[-1].input).predict(x, verbose=0)
    head = model.layers[-1]
    return np.asarray(features @ head.kernel.numpy() + head.bias.numpy())


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def test_the_mirrored_model_answers_the_mean_of_a_drawings_and_its_mirrors_logits(
    model_settings: ModelSettings,
) -> None:
    plain, mirrored = pair()
    x = drawings(6)
    mirror = x[:, :, ::-1]
    expected = softmax((logits(plain, x) + logits(plain, mirror)) / 2)
    answered = mirrored.predict(x, verbose=0)
    assert answered.shape == (6, CLASSES)
    np.testing.assert_allclose(answered, expected, atol=1e-5)
    # A drawing and its mirror image get the same answer; the plain model tells them apart.
    np.testing.assert_allclose(mirrored.predict(mirror, verbose=0), answered, atol=1e-5)
    assert np.abs(plain.predict(mirror, verbose=0) - plain.predict(x, verbose=0)).max() > 1e-4
    assert len(mirrored.get_weights()) == len(plain.get_weights())


def test_a_saved_mirrored_model_loads_in_a_new_worker_process(
    tmp_path: Path, registry: Registry, model_settings: ModelSettings
) -> None:
    _, mirrored = pair()
    mirrored.save(tmp_path / "model.keras")
    x = drawings(3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", mirrored.predict(x, verbose=0))
    # A fresh interpreter, through the worker's own loader: nothing but it registers the layers.
    script = (
        "import sys, numpy as np\nfrom pathlib import Path\n"
        "from contracts.registry import load_registry\nfrom model.config import ModelSettings\n"
        "from model.runtimes import keras_model\n"
        "settings = ModelSettings(_env_file=None, trained_dir=Path(sys.argv[1]))\n"
        "entry = load_registry(settings.registry_path).get('sketch@3').model_copy(update={'file': '{trained_dir}/model.keras'})\n"
        "model, random_weights = keras_model(entry, settings)\n"
        "got = model.predict(np.load(Path(sys.argv[1]) / 'x.npy'), verbose=0)\n"
        "np.testing.assert_allclose(got, np.load(Path(sys.argv[1]) / 'expected.npy'), atol=1e-6)\n"
        "assert not random_weights and 'MirrorStack' in {type(m).__name__ for m in model.layers}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_grad_cam_of_a_mirrored_model_follows_the_drawing_when_it_is_mirrored(
    registry: Registry, model_settings: ModelSettings
) -> None:
    from model.gradcam import GradCam

    plain, mirrored = pair()
    entry = registry.get("sketch@3")
    labels = tuple(f"class{i}" for i in range(CLASSES))
    cam = GradCam.build(mirrored, entry, labels)
    assert cam.mirrored and not GradCam.build(plain, entry, labels).mirrored
    x = drawings(1)[0]
    target = int(mirrored.predict(x[None], verbose=0).argmax())
    heat = cam.cam(x, target)
    assert heat.shape == (7, 7) and heat.max() == pytest.approx(1.0)
    # The averaged score's map of the mirror image is the map mirrored: each half is weighed by
    # its own gradients and the mirror's half is flipped back (reading one half only breaks this).
    np.testing.assert_allclose(cam.cam(x[:, ::-1], target), heat[:, ::-1], atol=1e-4)
