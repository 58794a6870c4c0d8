"""The model store: a version's files appear whole, the model file last."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from model.store import PROGRESS_STALE_S, clear_progress, progress_path, read_progress, write_progress, written_into


def test_a_versions_files_go_in_with_the_model_file_last_and_nothing_else_is_touched(tmp_path: Path) -> None:
    """A folder shared with other files (a model placed in MODELS_DIR itself, say) keeps them, and
    a reader never finds the model file without its weights: the .bin is in place first."""
    shared = tmp_path / "models"
    shared.mkdir()
    (shared / "other.weights.h5").write_bytes(b"keep me")
    model_file = shared / "int8.xml"
    seen: list[tuple[str, bool]] = []
    original = os.replace

    def watched(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        original(src, dst)
        seen.append((Path(dst).name, model_file.with_suffix(".bin").exists()))

    with written_into(model_file) as staging:
        assert staging.parent == shared and staging.name.startswith(".")
        (staging / "int8.xml").write_text("<net/>")
        (staging / "int8.bin").write_bytes(b"weights")
        os.replace = watched  # type: ignore[assignment]
    os.replace = original
    assert seen == [("int8.bin", True), ("int8.xml", True)]
    assert sorted(p.name for p in shared.iterdir()) == ["int8.bin", "int8.xml", "other.weights.h5"]

    with pytest.raises(RuntimeError), written_into(model_file) as staging:
        (staging / "int8.xml").write_text("half")
        raise RuntimeError("interrupted")
    assert (model_file.read_text(), sorted(p.name for p in shared.iterdir())) == (
        "<net/>",
        ["int8.bin", "int8.xml", "other.weights.h5"],
    )


def test_a_trainings_progress_is_read_until_it_ends_or_goes_stale(tmp_path: Path) -> None:
    model_file = tmp_path / "sketch" / "v3" / "model.keras"
    assert read_progress(model_file) is None
    write_progress(model_file, epoch=4, epochs=12)
    assert read_progress(model_file) == (4, 12)
    assert progress_path(model_file).name.startswith(".")  # never taken for a version's file
    # A training killed mid-run stops renewing its note: after a while it says nothing.
    assert read_progress(model_file, now=time.time() + PROGRESS_STALE_S + 1) is None
    progress_path(model_file).write_text("{half")
    assert read_progress(model_file) is None
    clear_progress(model_file)
    clear_progress(model_file)  # gone already: nothing to do
    assert read_progress(model_file) is None and sorted(p.name for p in model_file.parent.iterdir()) == []
