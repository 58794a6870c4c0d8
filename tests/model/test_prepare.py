"""``model.prepare`` trains a registry entry whose training names a folder of users' drawings."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from contracts.registry import ModelEntry, Registry
from model import store
from model.config import ModelSettings
from model.prepare import DEFAULT_CATEGORIES, prepare_trained, training_key
from model.store import progress_path, read_progress, version_lock
from tests.model.drawings import feedback_folder
from tests.support import ROOT, wait_until

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
    tmp_path: Path,
    model_settings: ModelSettings,
    registry: Registry,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder, _cats = feedback_folder(tmp_path / "export", model_settings)
    settings = model_settings.model_copy(
        update={"trained_dir": tmp_path / "trained", "training_cache_dir": tmp_path / "cache"}
    )
    (tmp_path / "trained").mkdir()
    entry = feedback_entry(registry, "{trained_dir}/../export/sketch")
    caplog.set_level(logging.INFO, logger="model.prepare")

    noted: list[tuple[int, int, bool]] = []
    write = store.write_progress

    def note(model_file: Path, *, epoch: int, epochs: int) -> None:
        write(model_file, epoch=epoch, epochs=epochs)
        noted.append((epoch, epochs, read_progress(model_file) == (epoch, epochs)))

    monkeypatch.setattr(store, "write_progress", note)
    prepare_trained(entry, tmp_path / "v3", settings)
    # Workers read how far it is while it trains (one epoch here); the note goes with the run.
    assert sorted(set(noted)) == [(0, 1, True), (1, 1, True)]
    assert not progress_path(tmp_path / "v3" / "model.keras").exists()
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


def test_deferred_training_copies_from_the_cache_and_trains_nothing(
    tmp_path: Path, model_settings: ModelSettings, registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    """``--defer-training`` (what `make run` does before it serves): a version the cache holds is
    copied, model file included; one it does not hold is left untrained, said so in the log."""
    settings = model_settings.model_copy(update={"training_cache_dir": tmp_path / "cache"})
    caplog.set_level(logging.INFO, logger="model.prepare")
    entry = feedback_entry(registry, str(tmp_path / "export"))
    (tmp_path / "export").mkdir()
    prepare_trained(entry, tmp_path / "v3", settings, train=False)
    assert not (tmp_path / "v3").exists() and "not trained yet" in caplog.text

    options = dict(entry.training or {})
    categories = str(options.pop("categories")).split(",")
    feedback = tmp_path / "export"
    del options["feedback"]
    cached = settings.training_cache_dir / training_key(options, categories, settings.quickdraw_dir, feedback)
    cached.mkdir(parents=True)
    for name in ("model.keras", "labels.txt", "metrics.json"):
        (cached / name).write_text(name)
    prepare_trained(entry, tmp_path / "v3", settings, train=False)
    assert sorted(p.name for p in (tmp_path / "v3").iterdir()) == ["labels.txt", "metrics.json", "model.keras"]
    assert (tmp_path / "v3" / "model.keras").read_text() == "model.keras"


def prepare_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment of a ``python -m model.prepare`` making sketch@1 into a folder of the test's
    own, with an empty training cache, and that folder."""
    trained = tmp_path / "trained"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TRAINED_DIR": str(trained),
        "TRAINING_CACHE_DIR": str(tmp_path / "cache"),
        "SERVE_MODELS": "sketch@1",
    }
    return env, trained


def test_two_prepares_never_make_one_version_at_once(tmp_path: Path, model_settings: ModelSettings) -> None:
    """While one ``model.prepare`` makes a version, `make run`'s deferring one goes on without it
    and a full one waits, then finds the file written and trains nothing."""
    env, trained = prepare_env(tmp_path)
    command = [sys.executable, "-m", "model.prepare"]
    folder = trained / "sketch" / "v1"
    with version_lock(folder / "model.keras", "sketch@1"):
        deferring = subprocess.run([*command, "--defer-training"], env=env, capture_output=True, text=True, timeout=120)
        assert deferring.returncode == 0 and "not waited for" in deferring.stderr, deferring.stderr
        log = tmp_path / "waiting.log"
        with open(log, "w") as output:
            waiting = subprocess.Popen(command, env=env, stderr=output)
        wait_until(lambda: "waiting for another" in log.read_text(), 120, "the second prepare to wait")
        time.sleep(1)
        assert waiting.poll() is None
        shutil.copytree(model_settings.trained_dir / "sketch" / "v1", folder, dirs_exist_ok=True)
    assert waiting.wait(60) == 0
    err = log.read_text()
    assert "made meanwhile" in err and "training into" not in err, err


def test_a_version_that_fails_to_train_leaves_the_others_to_be_made(tmp_path: Path, registry: Registry) -> None:
    """A version that fails is logged and the next ones are still tried; the exit status says
    something failed, except for `make run`'s deferring run, after which the portal must start."""
    broken = tmp_path / "quickdraw"
    broken.mkdir()
    for category in DEFAULT_CATEGORIES.split(","):
        (broken / f"{category}.npy").write_bytes(b"not a numpy file")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TRAINED_DIR": str(tmp_path / "trained"),
        "TRAINING_CACHE_DIR": str(tmp_path / "cache"),
        "QUICKDRAW_DIR": str(broken),
        "SERVE_MODELS": "sketch@1,sketch@2",
    }
    run = subprocess.run([sys.executable, "-m", "model.prepare"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr
    assert "sketch@1: training failed" in run.stderr and "sketch@2: training failed" in run.stderr, run.stderr
    assert "not made: sketch@1, sketch@2" in run.stderr
    assert sorted(p.name for p in (tmp_path / "trained" / "sketch" / "v1").iterdir()) == [".model.keras.lock"]
    (broken / "cat.npy").unlink()  # the deferring run reads no data: it trains nothing
    deferring = subprocess.run(
        [sys.executable, "-m", "model.prepare", "--defer-training"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deferring.returncode == 0 and "not trained yet" in deferring.stderr, deferring.stderr


def test_a_prepare_stopped_mid_training_leaves_neither_half_a_version_nor_its_progress(tmp_path: Path) -> None:
    """supervisord stops `make run`'s background prepare with SIGTERM: it exits at once, and users
    no longer read that the version is being trained."""
    env, trained = prepare_env(tmp_path)
    model_file = trained / "sketch" / "v1" / "model.keras"
    prepare = subprocess.Popen([sys.executable, "-m", "model.prepare"], env=env, stderr=subprocess.DEVNULL)
    try:
        # Stopped in the middle of Keras' fit, a few epochs before its end.
        wait_until(lambda: (read_progress(model_file) or (0, 0))[0] >= 1, 120, "an epoch trained")
        prepare.send_signal(signal.SIGTERM)
        assert prepare.wait(60) == 128 + signal.SIGTERM
    finally:
        prepare.kill()
    assert read_progress(model_file) is None
    assert sorted(p.name for p in model_file.parent.iterdir()) == [".model.keras.lock"]
