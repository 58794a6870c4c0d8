"""The sketch trainer with users' labelled drawings (the folders ``api.cli export-feedback`` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from contracts.registry import Registry
from model.config import ModelSettings
from model.preprocessing import preprocess
from model.training.train_sketch import load_feedback, train
from tests.model.drawings import feedback_folder

CATEGORIES = ["cat", "fish"]


def test_feedback_drawings_are_read_as_the_service_reads_uploads(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry
) -> None:
    folder, _cats = feedback_folder(tmp_path, model_settings)
    x, y, skipped = load_feedback(folder, CATEGORIES)
    assert x.shape == (2, 28, 28, 1) and y.tolist() == [0, 0]
    assert skipped == {"other_labels": 1, "unreadable": 1}
    entry = registry.find("sketch", 1, benchmark_mode=False)
    assert entry is not None
    served = [preprocess((folder / "cat" / f"{i}.png").read_bytes(), entry) for i in range(2)]
    np.testing.assert_array_equal(x, np.stack(served))


def test_training_adds_feedback_to_the_training_split_only(tmp_path: Path, model_settings: ModelSettings) -> None:
    folder, _cats = feedback_folder(tmp_path, model_settings)
    common = {"data": model_settings.quickdraw_dir, "categories": CATEGORIES, "epochs": 1, "per_category": 100}
    plain = train(**common, out=tmp_path / "plain")  # type: ignore[arg-type]
    metrics = train(**common, out=tmp_path / "with-feedback", feedback=folder)  # type: ignore[arg-type]

    assert "feedback" not in plain
    assert metrics["samples"] == {"train": 160 + 2, "validation": 20, "test": 20}
    assert plain["samples"] == {"train": 160, "validation": 20, "test": 20}
    used = metrics["feedback"]
    assert used["drawings"] == 2 and used["per_category"] == {"cat": 2, "fish": 0}  # type: ignore[index]
    assert used["skipped"] == {"other_labels": 1, "unreadable": 1}  # type: ignore[index]
    assert 0.0 <= used["answered_as_labelled"] <= 1.0  # type: ignore[index,operator]
    saved = json.loads((tmp_path / "with-feedback" / "metrics.json").read_text())
    assert saved["feedback"] == used
    assert (tmp_path / "with-feedback" / "model.keras").is_file()
