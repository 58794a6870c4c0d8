from __future__ import annotations

import os
from pathlib import Path

import pytest

from contracts.registry import Registry, load_registry
from model.config import ModelSettings
from model.runtimes import LoadedModel, configure_tensorflow, load_model


@pytest.fixture(scope="session")
def model_settings() -> ModelSettings:
    s = ModelSettings(_env_file=None, allow_weight_download=False, models_dir=Path(os.environ["MODELS_DIR"]))  # type: ignore[call-arg]
    configure_tensorflow(s)
    return s


@pytest.fixture(scope="session")
def registry(model_settings: ModelSettings) -> Registry:
    return load_registry(model_settings.registry_path)


@pytest.fixture(scope="session")
def loaded(model_settings: ModelSettings, registry: Registry) -> dict[str, LoadedModel]:
    """Every model this machine can serve, loaded once through the worker's own code path."""
    out = {}
    for key in ("mobilenet_v2@1", "mobilenet_v2@2", "sketch@1", "sketch@2", "sketch@3", "birds@1"):
        name, version = key.split("@")
        entry = registry.find(name, int(version), benchmark_mode=False)
        assert entry is not None
        out[key] = load_model(entry, model_settings)
    return out
