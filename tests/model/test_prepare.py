"""``model.prepare`` trains a registry entry whose training names a folder of users' drawings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from contracts.registry import ModelEntry, Registry
from model.config import ModelSettings
from model.prepare import prepare_trained, training_key
from tests.model.drawings import feedback_folder

OPTIONS = {"arch": "compact", "epochs": 1, "per_category": 100, "categories": "cat,fish"}


def feedback_entry(registry: Registry, folder: str) -> ModelEntry:
    entry = registry.find("sketch", 1, benchmark_mode=False)
    assert entry is not None
    return entry.model_copy(update={"version": 3, "training": {**OPTIONS, "feedback": folder}})


def test_the_feedback_folder_is_part_of_the_training_key(tmp_path: Path, model_settings: ModelSettings) -> None:
    folder, _cats = feedback_folder(tmp_path, model_settings)
    data = model_settings.quickdraw_dir
    without = training_key({"epochs": 1}, ["cat", "fish"], data)
    first = training_key({"epochs": 1}, ["cat", "fish"], data, folder)
    assert first != without and first == training_key({"epochs": 1}, ["cat", "fish"], data, folder)
    (folder / "fish").mkdir()
    (folder / "fish" / "new.png").write_bytes((folder / "cat" / "0.png").read_bytes())
    assert training_key({"epochs": 1}, ["cat", "fish"], data, folder) != first


def test_prepare_trains_with_feedback_then_copies_from_the_cache(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    folder, _cats = feedback_folder(tmp_path / "export", model_settings)
    settings = model_settings.model_copy(
        update={"trained_dir": tmp_path / "trained", "training_cache_dir": tmp_path / "cache"}
    )
    (tmp_path / "trained").mkdir()
    entry = feedback_entry(registry, "{trained_dir}/../export/sketch")
    caplog.set_level(logging.INFO, logger="model.prepare")

    prepare_trained(entry, tmp_path / "v3", settings)
    metrics = json.loads((tmp_path / "v3" / "metrics.json").read_text())
    assert metrics["feedback"]["drawings"] == 2 and metrics["feedback"]["folder"] == str(
        tmp_path / "trained" / ".." / "export" / "sketch"
    )
    assert (tmp_path / "v3" / "model.keras").is_file()

    prepare_trained(entry, tmp_path / "again", settings)
    assert "copied from the training cache" in caplog.text
    assert json.loads((tmp_path / "again" / "metrics.json").read_text()) == metrics
    assert folder.is_dir()


def test_a_missing_feedback_folder_leaves_the_version_untrained(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    settings = model_settings.model_copy(update={"training_cache_dir": tmp_path / "cache"})
    prepare_trained(feedback_entry(registry, str(tmp_path / "nowhere")), tmp_path / "v3", settings)
    assert not (tmp_path / "v3").exists()
    assert "feedback folder" in caplog.text and "not trained" in caplog.text
