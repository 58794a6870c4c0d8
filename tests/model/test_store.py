"""The model store: a version's files appear whole, the model file last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model import store
from model.store import (
    CLOCK_SLACK_S,
    PROGRESS_STALE_S,
    ProgressNote,
    clear_progress,
    progress_path,
    read_progress,
    remove_abandoned_staging,
    version_lock,
    write_progress,
    written_into,
)
from tests.support import ROOT


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
    # A training that stops renewing its note says nothing after a while, nor does a note from
    # the future (a clock set back), nor one with numbers no training writes.
    assert read_progress(model_file, now=time.time() + PROGRESS_STALE_S + 1) is None
    assert read_progress(model_file, now=time.time() - CLOCK_SLACK_S - 60) is None
    note = json.loads(progress_path(model_file).read_text())
    for bad in ({"epoch": 1e400}, {"epoch": 13}, {"epoch": -1}, {"updated_at": float("nan")}, {"epochs": "x"}):
        progress_path(model_file).write_text(json.dumps({**note, **bad}))
        assert read_progress(model_file) is None, bad
    progress_path(model_file).write_text("{half")
    assert read_progress(model_file) is None
    clear_progress(model_file)
    clear_progress(model_file)  # gone already: nothing to do
    assert read_progress(model_file) is None and sorted(p.name for p in model_file.parent.iterdir()) == []


def test_a_note_whose_writer_is_gone_says_nothing(tmp_path: Path) -> None:
    """A training killed outright (SIGKILL, the OOM killer) leaves its note: a reader on its host
    sees that its process is gone."""
    model_file = tmp_path / "model.keras"
    code = (
        "import sys\nfrom pathlib import Path\nfrom model.store import write_progress\n"
        "write_progress(Path(sys.argv[1]), epoch=2, epochs=12)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model_file)], check=True, cwd=ROOT)
    assert progress_path(model_file).exists() and read_progress(model_file) is None
    # One written on another host is believed while it is renewed.
    note = json.loads(progress_path(model_file).read_text())
    progress_path(model_file).write_text(json.dumps({**note, "host": "another-host"}))
    assert read_progress(model_file) == (2, 12)


def test_the_note_is_renewed_while_the_training_runs_and_removed_when_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "PROGRESS_RENEW_S", 0.05)
    model_file = tmp_path / "model.keras"
    with pytest.raises(RuntimeError), ProgressNote(model_file, 12) as note:
        first = json.loads(progress_path(model_file).read_text())
        note.epoch(3)
        time.sleep(0.3)
        renewed = json.loads(progress_path(model_file).read_text())
        assert (renewed["epoch"], renewed["epochs"]) == (3, 12) and renewed["updated_at"] > first["updated_at"]
        raise RuntimeError("the training failed")
    assert not progress_path(model_file).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_staging_left_by_a_killed_maker_is_removed_and_one_being_written_stays(tmp_path: Path) -> None:
    """A maker killed by SIGKILL leaves ``.<name>.partial``; a version being written holds its lock,
    and its staging folder must stay whoever sweeps."""
    abandoned = tmp_path / "sketch" / "v4" / ".model.keras.partial"
    writing = tmp_path / "sketch" / "v5" / ".model.keras.partial"
    quantized = tmp_path / "mobilenet_v2" / "v2" / ".model.xml.partial"
    for folder in (abandoned, writing, quantized):
        folder.mkdir(parents=True)
        (folder / "part").write_bytes(b"half")
        # Made by its maker's version_lock before the folder.
        folder.with_name(folder.name.replace(".partial", ".lock")).touch()
    # Left: a folder named "..partial" and one without a lock file (here inside the folder being
    # written), not a maker's; one whose lock file cannot be opened (sorted before the abandoned
    # one, which is removed all the same).
    odd = [
        tmp_path / "sketch" / "v6" / "..partial",
        writing / ".inner.partial",
        tmp_path / "sketch" / "v3" / ".m.partial",
    ]
    for folder in odd:
        folder.mkdir(parents=True)
    (tmp_path / "sketch" / "v3" / ".m.lock").symlink_to("/proc/version")  # EINVAL when opened to append
    (tmp_path / "sketch" / "v6").mkdir(exist_ok=True)
    (tmp_path / "sketch" / "v6" / ".notes.partial").write_text("a file, not a staging folder")
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept").write_text("not the store's")
    (tmp_path / "sketch" / "v6" / ".link.partial").symlink_to(elsewhere, target_is_directory=True)
    with version_lock(writing.parent / "model.keras", "sketch@5") as held:
        assert held
        removed = remove_abandoned_staging(tmp_path)
        assert writing.is_dir()
    assert sorted(removed) == sorted([abandoned, quantized])
    # Their versions' folders go too, with their lock files: nothing else is in them.
    assert not abandoned.parent.exists() and not quantized.parent.exists()
    assert (tmp_path / "sketch" / "v6" / ".notes.partial").is_file()
    assert (elsewhere / "kept").is_file() and (tmp_path / "sketch" / "v6" / ".link.partial").is_symlink()
    assert all(folder.is_dir() for folder in odd)
    assert not (tmp_path / "sketch" / "v6" / ".link.lock").exists() and not (writing / ".inner.lock").exists()
