"""``model.prepare`` writes the ImageNet weights files the registry names, so that a worker that
may not download (the model image's, ALLOW_WEIGHT_DOWNLOAD=false) loads them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from contracts.registry import ModelEntry, Registry
from model import prepare
from model.config import ModelSettings
from model.runtimes import _keras_application
from tests.support import ROOT

KERAS_CACHE_NAME = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
"""The file keras.applications.MobileNetV2(weights='imagenet') downloads into ``KERAS_HOME/models``."""


def registry_of(registry: Registry, *keys: str) -> Registry:
    """The registry reduced to the versions ``keys`` name."""
    entries = [registry.get(key) for key in keys]
    return Registry(default_order=sorted({e.name for e in entries}), models=entries)


def write_registry(path: Path, registry: Registry) -> Path:
    path.write_text(yaml.safe_dump(registry.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


@pytest.fixture()
def keras_home(tmp_path: Path, model_settings: ModelSettings) -> Path:
    """A KERAS_HOME whose cache holds MobileNetV2's ImageNet weights as Keras downloads them (the
    legacy HDF5 layout), made from the shared weights file: Keras finds it and fetches nothing."""
    import h5py  # type: ignore[import-untyped]
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    home = tmp_path / "keras"
    (home / "models").mkdir(parents=True)
    model = keras.applications.MobileNetV2(weights=str(model_settings.models_dir / "mobilenet_v2_imagenet.weights.h5"))
    with h5py.File(home / "models" / KERAS_CACHE_NAME, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return home


def test_prepare_writes_the_imagenet_weights_file_a_worker_then_loads_offline(
    tmp_path: Path, keras_home: Path, model_settings: ModelSettings, registry: Registry
) -> None:
    """The model image's build: ``python -m model.prepare`` with an empty MODELS_DIR writes
    MobileNetV2's weights file from what Keras fetched (here its cache: no network), and a worker
    that may not download loads that file with the original weights' answers."""
    models = tmp_path / "models"
    models.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("SERVE_MODELS", "BENCHMARK_MODE")},
        "PYTHONPATH": str(ROOT),
        "KERAS_HOME": str(keras_home),
        "MODELS_DIR": str(models),
        "TRAINED_DIR": str(tmp_path / "trained"),
        "TRAINING_CACHE_DIR": str(tmp_path / "cache"),
        "REGISTRY_PATH": str(write_registry(tmp_path / "registry.yaml", registry_of(registry, "mobilenet_v2@1"))),
        "ALLOW_WEIGHT_DOWNLOAD": "true",
        "LOG_JSON": "false",
    }
    run = subprocess.run(
        [sys.executable, "-m", "model.prepare", "--require-weights"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    written = models / "mobilenet_v2_imagenet.weights.h5"
    assert written.is_file(), run.stderr
    # Written aside and renamed in: nothing but the file and its lock is left.
    assert sorted(p.name for p in models.iterdir()) == [".mobilenet_v2_imagenet.weights.h5.lock", written.name]

    entry = registry.get("mobilenet_v2@1")
    offline = model_settings.model_copy(update={"models_dir": models, "allow_weight_download": False})
    loaded, random_weights = _keras_application(entry, offline)
    original, _ = _keras_application(entry, model_settings)
    assert not random_weights
    batch = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(batch, verbose=0), original.predict(batch, verbose=0))  # type: ignore[attr-defined]


def test_without_downloads_a_missing_weights_file_is_left_and_said(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="model.prepare")
    settings = model_settings.model_copy(update={"models_dir": tmp_path, "allow_weight_download": False})
    prepare.fetch_imagenet_weights([registry.get("mobilenet_v2@1")], settings)
    assert list(tmp_path.iterdir()) == []
    assert "weight downloads are disabled" in caplog.text


def test_a_failed_download_leaves_nothing_in_the_models_dir(
    tmp_path: Path,
    model_settings: ModelSettings,
    registry: Registry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No network: the version is said missing, and MODELS_DIR (a shared folder, maybe) is untouched."""

    def offline(entry: ModelEntry) -> None:
        raise OSError("URL fetch failure: Name or service not known")

    monkeypatch.setattr(prepare, "imagenet_model", offline)
    settings = model_settings.model_copy(update={"models_dir": tmp_path, "allow_weight_download": True})
    assert prepare.fetch_imagenet_weights([registry.get("mobilenet_v2@1")], settings) == ["mobilenet_v2@1"]
    assert list(tmp_path.iterdir()) == []
    assert "ImageNet weights not written" in caplog.text and "Name or service not known" in caplog.text


class FakeModel:
    """Stands for a keras.applications model: writes a stand-in weights file."""

    def save_weights(self, path: Path) -> None:
        path.write_bytes(b"weights")


def quick_settings(tmp_path: Path, model_settings: ModelSettings, registry: Registry, **update: Any) -> ModelSettings:
    """Settings of a prepare serving mobilenet_v2@2 alone (quantized from mobilenet_v2@1), in
    folders of the test's own."""
    return model_settings.model_copy(
        update={
            "models_dir": tmp_path / "models",
            "trained_dir": tmp_path / "trained",
            "registry_path": write_registry(
                tmp_path / "registry.yaml", registry_of(registry, "mobilenet_v2@1", "mobilenet_v2@2")
            ),
            "serve_models": "mobilenet_v2@2",
            **update,
        }
    )


def run_main(monkeypatch: pytest.MonkeyPatch, settings: ModelSettings, argv: list[str]) -> tuple[int, list[str]]:
    """``model.prepare``'s main in this process with ``settings``, Keras and quantization stood
    in for: its exit status and what it did, in order."""
    events: list[str] = []
    weights = settings.models_dir / "mobilenet_v2_imagenet.weights.h5"

    def build(entry: ModelEntry) -> FakeModel:
        events.append(f"weights {entry.key}")
        return FakeModel()

    def quantize(entry: ModelEntry, source: ModelEntry, out: Path, _settings: ModelSettings) -> None:
        events.append(f"quantize {entry.key} from {source.key}, weights there: {weights.exists()}")

    monkeypatch.setattr(prepare, "load_model_settings", lambda _process: settings)
    monkeypatch.setattr(prepare, "imagenet_model", build)
    monkeypatch.setattr(prepare, "prepare_quantized", quantize)
    monkeypatch.setattr(prepare.signal, "signal", lambda *_: None)  # the test process keeps its own
    return prepare.main(argv), events


def test_the_weights_an_int8_version_is_quantized_from_are_written_before_it(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quantizing mobilenet_v2@2 loads mobilenet_v2@1's weights file (and the quantization cache's
    key names it): prepare writes that file first, even for a worker serving the INT8 version alone."""
    settings = quick_settings(tmp_path, model_settings, registry, allow_weight_download=True)
    status, events = run_main(monkeypatch, settings, [])
    assert status == 0
    assert events == ["weights mobilenet_v2@1", "quantize mobilenet_v2@2 from mobilenet_v2@1, weights there: True"]


def test_the_images_build_fails_without_the_weights(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--require-weights`` (the model image's build) stops with status 1 when a weights file could
    not be written, before quantizing or training; without it prepare goes on."""
    settings = quick_settings(tmp_path, model_settings, registry, allow_weight_download=False)
    status, events = run_main(monkeypatch, settings, ["--require-weights"])
    assert (status, events) == (1, [])
    status, events = run_main(monkeypatch, settings, [])
    assert (status, events) == (0, ["quantize mobilenet_v2@2 from mobilenet_v2@1, weights there: False"])


def test_imagenet_entries_are_the_ones_with_imagenet_weights_from_a_file(registry: Registry) -> None:
    served = registry.served(benchmark_mode=True)
    assert [e.key for e in prepare.imagenet_entries(served, registry)] == ["resnet50@1", "mobilenet_v2@1"]
    assert prepare.imagenet_entries([registry.get("sketch@3"), registry.get("resnet50_random@2")], registry) == []
