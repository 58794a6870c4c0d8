"""The model store: how a version's files are written where workers load them.

Workers and the explainer load a version as soon as its model file exists (``model.runtimes.
model_stamp``), so its files appear whole: written aside and moved in with the model file last.
Both ``model.prepare`` and ``model.trainer`` write versions this way and under one lock per version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("model.store")


@contextlib.contextmanager
def written_into(model_file: Path) -> Iterator[Path]:
    """A fresh staging folder in ``model_file``'s folder (``.<name>.partial``: hidden, and one
    level below the version's records) to write a version's files into. Once the block ends
    without an error, each file is moved into the folder by a rename, ``model_file`` last (an
    OpenVINO .xml after its .bin), so a reader that finds the model file finds the rest; nothing
    else in the folder is touched. The staging folder is removed in any case."""
    folder = model_file.parent
    staging = folder / f".{model_file.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in sorted(staging.iterdir(), key=lambda p: p.name == model_file.name):
            os.replace(path, folder / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def version_lock(model_file: Path, key: str, *, wait: bool = True) -> Iterator[bool]:
    """Holds ``.<name>.lock`` beside ``model_file`` (flock(2)) while one process makes it, so two
    makers (a `make run` training in the background beside a `make test`, or ``model.trainer``
    writing a version that ``registry.yaml`` names too) never write it at once: the second waits
    and then finds the file made, or, without ``wait``, goes on at once; yields whether the lock
    is held. The kernel drops the lock with its holder, so a killed maker never strands it."""
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with open(model_file.with_name(f".{model_file.name}.lock"), "a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        if not held:
            if not wait:
                # Outside the except block: an error the caller raises is not chained to this one.
                yield False
                return
            log.info("%s: waiting for another process making it", key)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


PROGRESS_STALE_S = 900.0
"""A progress note not renewed for this long is a training that died: one epoch of the slowest
recipe takes about 3 min on a 2-core host without bfloat16 arithmetic (the README's sketch section)."""


def progress_path(model_file: Path) -> Path:
    """The hidden note beside ``model_file`` that says how far its training is."""
    return model_file.with_name(f".{model_file.name}.progress.json")


def write_progress(model_file: Path, *, epoch: int, epochs: int) -> None:
    """Notes that ``epoch`` of ``epochs`` epochs of ``model_file``'s training are done (replaced
    whole by a rename: a reader never sees half of it)."""
    path = progress_path(model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"epoch": epoch, "epochs": epochs, "updated_at": time.time()}), encoding="utf-8")
    os.replace(tmp, path)


def read_progress(model_file: Path, *, now: float | None = None) -> tuple[int, int] | None:
    """(epochs done, epochs) of ``model_file``'s training; None when no training notes any, or its
    note is unreadable or older than ``PROGRESS_STALE_S``."""
    try:
        note = json.loads(progress_path(model_file).read_text(encoding="utf-8"))
        epoch, epochs, updated_at = int(note["epoch"]), int(note["epochs"]), float(note["updated_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (time.time() if now is None else now) - updated_at > PROGRESS_STALE_S:
        return None
    return epoch, epochs


def clear_progress(model_file: Path) -> None:
    """Removes ``model_file``'s progress note, if any: its training ended."""
    progress_path(model_file).unlink(missing_ok=True)
