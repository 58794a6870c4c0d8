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
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def remove_unmade(model_file: Path) -> None:
    """Removes the lock file of a version whose making ended without its model file (a cancelled or
    failed training run), and its folder when nothing else is in it. Called while that lock is
    held: run versions are never numbered again, so both would otherwise stay for good, an empty
    version folder in the model store."""
    model_file.with_name(f".{model_file.name}.lock").unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something else is kept there
        model_file.parent.rmdir()


def remove_abandoned_staging(root: Path) -> list[Path]:
    """Removes the staging folders under ``root`` that a killed maker left (``.<name>.partial``,
    ``written_into``) and returns them. A maker writes one only while it holds that version's lock
    (``version_lock``: ``.<name>.lock`` beside it), so a folder whose lock is free has no writer;
    one whose lock is held is being written and stays, and one without a lock file, a symbolic
    link or a file was not made by a maker and is left alone. A maker stopped by a signal removes
    its own: this is for SIGKILL, the OOM killer and a lost host, whose versions are never
    numbered again and would keep it for good (with its lock file and version folder, removed too
    where the model file was never made: ``remove_unmade``). A folder that cannot be checked or
    removed is logged and left; the others are still swept."""
    removed: list[Path] = []
    for staging in sorted(root.glob("**/.*.partial")):
        name = staging.name[1 : -len(".partial")]
        lock = staging.with_name(f".{name}.lock")
        if not name or staging.is_symlink() or not staging.is_dir() or not lock.is_file():
            continue
        try:
            with version_lock(staging.with_name(name), str(staging), wait=False) as held:
                if held:
                    shutil.rmtree(staging)
                    removed.append(staging)
                    if not staging.with_name(name).exists():
                        remove_unmade(staging.with_name(name))
        except OSError as exc:
            log.warning("%s not removed: %s", staging, exc)
    return removed


PROGRESS_RENEW_S = 30.0
"""How often a running training renews its progress note, epoch or not (an epoch of the slowest
recipe takes minutes, and the data may be downloading before the first)."""
PROGRESS_STALE_S = 120.0
"""A note not renewed for this long (four renewals missed) is a training that died."""
CLOCK_SLACK_S = 60.0
"""How far in the future a note's time may be (clocks of two hosts) before it is disbelieved."""


def progress_path(model_file: Path) -> Path:
    """The hidden note beside ``model_file`` that says how far its training is."""
    return model_file.with_name(f".{model_file.name}.progress.json")


def write_progress(model_file: Path, *, epoch: int, epochs: int) -> None:
    """Notes that ``epoch`` of ``epochs`` epochs of ``model_file``'s training are done, with this
    process's host and pid (replaced whole by a rename: a reader never sees half of it)."""
    path = progress_path(model_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = {
        "epoch": epoch,
        "epochs": epochs,
        "updated_at": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(note), encoding="utf-8")
    os.replace(tmp, path)


def _alive(note: dict[str, Any]) -> bool:
    """False when the note's writer ran on this host and is gone; True when it runs or cannot be
    checked from here (another host: its renewals tell)."""
    if note.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(note["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
        return True
    return True


def read_progress(model_file: Path, *, now: float | None = None) -> tuple[int, int] | None:
    """(epochs done, epochs) of ``model_file``'s training; None when no training notes any, or its
    note is unreadable, out of range, not renewed for ``PROGRESS_STALE_S``, dated more than
    ``CLOCK_SLACK_S`` ahead, or written by a process of this host that is gone (a training killed,
    even by SIGKILL, says nothing)."""
    try:
        note = json.loads(progress_path(model_file).read_text(encoding="utf-8"))
        epoch, epochs, updated_at = int(note["epoch"]), int(note["epochs"]), float(note["updated_at"])
    except (OSError, ValueError, ArithmeticError, KeyError, TypeError):
        return None
    age = (time.time() if now is None else now) - updated_at
    if not (0 <= epoch <= epochs and epochs > 0 and -CLOCK_SLACK_S <= age <= PROGRESS_STALE_S):
        return None  # NaN fails every comparison, so it lands here too
    return (epoch, epochs) if _alive(note) else None


def clear_progress(model_file: Path) -> None:
    """Removes ``model_file``'s progress note, if any: its training ended."""
    progress_path(model_file).unlink(missing_ok=True)


class ProgressNote:
    """Keeps ``model_file``'s progress note while a training runs: "0 of ``epochs``" on entry,
    ``epoch(n)`` after each epoch, renewed every ``PROGRESS_RENEW_S`` by a thread, removed on exit
    whatever ends the block. A note that cannot be written is logged, never a reason to stop the
    training it describes."""

    def __init__(self, model_file: Path, epochs: int) -> None:
        self.model_file, self.epochs = model_file, epochs
        self._done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="progress-note", daemon=True)

    def __enter__(self) -> ProgressNote:
        self._write()
        self._renewer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._renewer.join()
        try:
            clear_progress(self.model_file)
        except OSError as exc:
            log.warning("could not remove the progress note of %s: %s", self.model_file, exc)

    def epoch(self, done: int) -> None:
        """Notes that ``done`` epochs are done."""
        self._done = done
        self._write()

    def _renew(self) -> None:
        while not self._stop.wait(PROGRESS_RENEW_S):
            self._write()

    def _write(self) -> None:
        with self._lock:  # the renewer and the training both write: one rename at a time
            try:
                write_progress(self.model_file, epoch=self._done, epochs=self.epochs)
            except OSError as exc:
                log.warning("could not note the progress of %s: %s", self.model_file, exc)
