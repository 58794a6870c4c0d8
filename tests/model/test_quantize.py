"""Calibration data and the cache key of INT8 versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contracts.registry import Registry
from model import prepare
from model.config import ModelSettings
from model.quantize import calibration_inputs, quantization_key
from model.runtimes import ModelUnavailable
from tests.support import PHOTOS


@pytest.fixture
def calibration(model_settings: ModelSettings) -> ModelSettings:
    return model_settings.model_copy(update={"calibration_dir": PHOTOS, "calibration_samples": 20})


def test_calibration_inputs_are_preprocessed_crops_and_repeatable(
    calibration: ModelSettings, registry: Registry
) -> None:
    entry = registry.get("mobilenet_v2@1")
    first, again = calibration_inputs(entry, calibration), calibration_inputs(entry, calibration)
    assert len(first) == 20
    assert all(x.shape == (224, 224, 3) and x.dtype == np.float32 for x in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    # MobileNetV2's preprocessing maps pixels to [-1, 1]; crops differ from each other.
    assert min(float(x.min()) for x in first) >= -1 and max(float(x.max()) for x in first) <= 1
    assert len({x.tobytes() for x in first}) == 20


def test_no_calibration_photos_is_a_clear_reason(
    calibration: ModelSettings, registry: Registry, tmp_path: Path
) -> None:
    empty = calibration.model_copy(update={"calibration_dir": tmp_path})
    with pytest.raises(ModelUnavailable, match="no calibration photos"):
        calibration_inputs(registry.get("mobilenet_v2@1"), empty)


def test_the_cache_key_follows_what_changes_the_model(calibration: ModelSettings, registry: Registry) -> None:
    entry, source = registry.get("mobilenet_v2@2"), registry.get("mobilenet_v2@1")
    key = quantization_key(entry, source, calibration)
    assert key == quantization_key(entry, source, calibration)
    more = calibration.model_copy(update={"calibration_samples": 21})
    assert quantization_key(entry, source, more) != key
    described = entry.model_copy(update={"description": "reworded"})
    assert quantization_key(described, source, calibration) == key


def test_an_int8_version_cannot_be_made_without_its_sources_weights(
    calibration: ModelSettings, registry: Registry, tmp_path: Path
) -> None:
    settings = calibration.model_copy(update={"models_dir": tmp_path, "trained_dir": tmp_path})
    entry = registry.get("resnet50@2")
    out = entry.resolve(entry.file or "", models_dir=tmp_path, trained_dir=tmp_path)
    with pytest.raises(ModelUnavailable, match="not found"):
        prepare.prepare_quantized(entry, registry.get("resnet50@1"), out, settings)
    assert not out.exists()
