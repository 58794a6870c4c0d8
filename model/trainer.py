"""The training worker: ``python -m model.trainer``. One run at a time, niced, in its own process,
never in an inference worker. It reads runs from the ``training:jobs`` stream (consumer group
``trainers``), reports progress (each epoch, and every few seconds within one) and the end on
``training:events``, holds a liveness key while it trains and stops within about a second of an
admin's cancel (``train_sketch.STOP_CHECK_EVERY_S``) whatever the run is doing: preparing its data
(a download too), part-way through an epoch, or evaluating the model after its last epoch."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from contracts import training
from contracts.streams import IDLE_CONSUMER_FORGET_MS, REDIS_ERRORS, ensure_group, forget_idle_consumers, group_missing
from model.config import ModelSettings, load_model_settings
from model.store import remove_abandoned_staging, remove_unmade, version_lock, written_into

log = logging.getLogger("model.trainer")


class VersionTaken(Exception):
    """The run's version has a model file already, or another process is writing it."""


class FeedbackMissing(Exception):
    """The folder the API exported the run's feedback examples into is not on this trainer's disk."""


class Diverged(Exception):
    """An epoch's training loss was not a finite number: the weights are NaN or infinite from then
    on, and more epochs would only take time. Raised in the training's own thread from the epoch's
    Keras callback, which ends ``model.fit`` there."""


STOPPED = training.STOPPED


class TrainerStopped(BaseException):
    """SIGTERM or SIGINT while a run trains, raised in the training's own thread: the run stops
    within a training step rather than at the end of an epoch that may take minutes (supervisord
    and Kubernetes kill a process that outlasts their grace period, leaving its files half made)."""


RUN_REDIS_RETRIES = 25
"""Times a run's Redis command is tried again on a connection error, after 0.2, 0.4, 0.8 and then
1 s each (redis-py's ``Retry`` with ``ExponentialBackoff``): about 23 s in all, longer than a run's
liveness key lives (``training.ALIVE_TTL_S``), so an outage the API does not fail the run for
does not fail it here either (an epoch's report, a cancel check or the end waits it out)."""


class Trainer:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        # Between runs, and once stopping: quick to give up (the loop tries again a second later),
        # so a stop while Redis is down ends the process within a grace period of 10 s.
        self.redis = redis.Redis.from_url(
            settings.redis_url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.1), 2), socket_connect_timeout=2
        )
        # During a run: patient, for the reports and checks an outage must not cut short.
        self.run_redis = redis.Redis.from_url(
            settings.redis_url,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), RUN_REDIS_RETRIES),
            socket_connect_timeout=2,
        )
        self.name = settings.worker_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.stopping = threading.Event()
        self.published: dict[str, tuple[float, int]] = {}
        self.scanned_at = 0.0
        self.training = False
        """Whether the main thread is inside a run's training (``on_signal`` then interrupts it)."""

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def on_signal(self, *_: Any) -> None:
        """The SIGTERM and SIGINT handler: stops after the run in progress, which it interrupts
        (``TrainerStopped``; the run is failed with the reason and nothing of it is kept)."""
        self.stopping.set()
        if self.training:
            raise TrainerStopped

    @property
    def reporting(self) -> redis.Redis:
        """The client a run's reports and checks go through: the patient one, unless stopping."""
        return self.redis if self.stopping.is_set() else self.run_redis

    def emit(self, event: training.TrainingEvent) -> None:
        client = self.reporting
        if event.kind in ("done", "failed", "cancelled"):
            client.set(training.ended_key(event.run_id), event.kind, ex=training.ENDED_TTL_S)
        client.xadd(training.EVENT_STREAM, event.to_fields(), maxlen=training.EVENT_STREAM_MAXLEN, approximate=True)

    def publish_records(self) -> None:
        """Puts each ``<model>/<version>/metrics.json`` under TRAINED_DIR that is new or changed
        into ``training:records`` (all of them again when the hash is gone: Redis restarted)."""
        self.scanned_at = time.monotonic()
        if not self.redis.exists(training.RECORDS_KEY):
            self.published.clear()
        for path in sorted(self.settings.trained_dir.glob("*/*/metrics.json")):
            folder = path.parent.relative_to(self.settings.trained_dir).as_posix()
            try:
                stat = path.stat()
                if self.published.get(folder) == (stat.st_mtime, stat.st_size):
                    continue
                text = path.read_text(encoding="utf-8")
                field = folder.encode()
            except (OSError, ValueError) as exc:  # ValueError: a file or folder name not UTF-8
                # %r: a name that is not UTF-8 holds lone surrogates, which a UTF-8 log cannot write.
                log.warning("training record %r not read: %s", str(path), exc)
                continue
            self.redis.hset(training.RECORDS_KEY, field, text)
            self.published[folder] = (stat.st_mtime, stat.st_size)
            log.info("training record of %s published", folder)

    def run(self) -> None:
        """Reads and trains runs until stopped; a run it took but did not finish (the process was
        stopped) is failed by the API once its liveness key expires."""
        group_ready = False
        while not self.stopping.is_set():
            try:
                if not group_ready:
                    ensure_group(self.redis, training.JOB_STREAM, training.JOB_GROUP)
                    group_ready = True
                if time.monotonic() - self.scanned_at >= training.RECORDS_SCAN_S:
                    self.publish_records()
                    # Trainers that stopped, each under a name of its own.
                    forget_idle_consumers(self.redis, training.JOB_STREAM, training.JOB_GROUP, IDLE_CONSUMER_FORGET_MS)
                reply = cast(
                    list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] | None,
                    self.redis.xreadgroup(
                        training.JOB_GROUP, self.name, {training.JOB_STREAM: ">"}, count=1, block=1000
                    ),
                )
                for _stream, entries in reply or []:
                    for entry_id, fields in entries:
                        # Acknowledged first: a run is tried once; one lost with this process fails.
                        self.redis.xack(training.JOB_STREAM, training.JOB_GROUP, entry_id)
                        job = self.readable(fields)
                        if job is not None:
                            self.train_one(job)
            except redis.exceptions.ResponseError as exc:
                if group_missing(exc):
                    group_ready = False
                    continue
                log.exception("trainer error")
                time.sleep(1)
            except REDIS_ERRORS:
                log.warning("redis unavailable; retrying")
                group_ready = False
                time.sleep(1)

    def readable(self, fields: dict[bytes, bytes]) -> training.TrainingJob | None:
        """The run a stream entry asks for; None for one this trainer cannot read (an option it does
        not know, from a newer API), whose run is then failed with the reason instead of ending the loop."""
        try:
            return training.TrainingJob.from_fields(fields)
        except (KeyError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            try:
                run_id = str(json.loads(fields[b"meta"])["run_id"])
            except (KeyError, ValueError, TypeError):
                log.error("unreadable training entry skipped: %s", exc)
                return None
            log.error("run %s: unreadable, failed: %s", run_id, exc)
            error = " ".join(f"the trainer cannot read this run: {exc}".split())[:500]
            self.emit(training.TrainingEvent(run_id=run_id, kind="failed", trainer=self.name, error=error))
            return None

    def keep_alive(self, run_id: str, done: threading.Event) -> None:
        """Renews the run's liveness key (``training.alive_key``) every third of its lifetime
        until ``done`` is set, whatever Redis answers meanwhile."""
        alive = training.alive_key(run_id)
        while not done.wait(training.ALIVE_TTL_S / 3):
            try:
                self.reporting.set(alive, self.name, ex=training.ALIVE_TTL_S)
            except Exception as exc:
                # A Redis blip must not end the renewals: tried again at the next beat. A thread
                # that died here would let the API fail a live run as one whose trainer stopped.
                log.warning("run %s: could not renew its liveness key: %s", run_id, exc)

    def train_one(self, job: training.TrainingJob) -> None:
        from model.training import train_sketch

        if self.reporting.exists(training.cancel_key(job.run_id)):
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="cancelled", trainer=self.name))
            return
        alive = training.alive_key(job.run_id)
        self.reporting.set(alive, self.name, ex=training.ALIVE_TTL_S)
        done = threading.Event()
        threading.Thread(target=self.keep_alive, args=(job.run_id, done), name="trainer-alive", daemon=True).start()
        epochs = job.options.epochs
        self.emit(training.TrainingEvent(run_id=job.run_id, kind="started", trainer=self.name, epochs=epochs))
        out = self.settings.trained_dir / job.model / f"v{job.version}"
        feedback = Path(job.feedback_dir) / job.model if job.feedback_dir else None
        model_file = out / "model.keras"
        try:
            if job.feedback_dir and not Path(job.feedback_dir).is_dir():
                # Trained without them, the run would look like one on the users' labels: the API
                # and the trainer do not share TRAINING_DATA_DIR.
                raise FeedbackMissing(
                    f"the users' examples exported for this run are not on the trainer ({self.name}): "
                    "the API and the trainer must share TRAINING_DATA_DIR"
                )
            with version_lock(model_file, f"{job.model}@{job.version}", wait=False) as held:
                key = f"{job.model}@{job.version}"
                if not held:
                    raise VersionTaken(f"{key} is being written by another process (model.prepare or another trainer)")
                if model_file.exists():
                    # registry.yaml may name this version, or a model store kept when the database
                    # was reset may hold it: a model file is never overwritten.
                    raise VersionTaken(
                        f"{key} has a model file in the model store already (left by an earlier portal?); "
                        "not overwritten: a new run trains the next version"
                    )
                try:
                    with written_into(model_file) as staging:
                        self.training = True
                        try:
                            record = self.train(job, staging, feedback)
                        finally:
                            self.training = False
                        if self.reporting.exists(training.cancel_key(job.run_id)):
                            # Cancelled while the model was saved (train_sketch checks up to then):
                            # the admin was told it would stop, so nothing of it is kept.
                            raise train_sketch.TrainingCancelled("cancelled after its last epoch, before it was kept")
                finally:
                    if not model_file.exists():
                        remove_unmade(model_file)
        except TrainerStopped:
            log.warning("run %s: the trainer was stopped during it", job.run_id)
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=STOPPED))
        except Diverged as exc:
            log.warning("run %s: %s", job.run_id, exc)
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=str(exc)))
        except (VersionTaken, FeedbackMissing) as exc:
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=str(exc)))
        except train_sketch.CategoryUnavailable as exc:
            # A base version registered by hand may have a label QuickDraw's folder here lacks.
            error = exc.describe("QUICKDRAW_DIR")
            log.warning("run %s: %s", job.run_id, error)
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=error))
        except train_sketch.TrainingCancelled as exc:
            if self.stopping.is_set():
                event = training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=STOPPED)
            else:
                event = training.TrainingEvent(run_id=job.run_id, kind="cancelled", trainer=self.name, error=str(exc))
            self.emit(event)
        except Exception as exc:  # a bad run must not stop the trainer
            if self.stopping.is_set():
                # The stop, raised where Python turns it into another error (inside an import, as
                # a class is made: RuntimeError "Error calling __set_name__").
                log.warning("run %s: the trainer was stopped during it (%s)", job.run_id, exc)
                error = STOPPED
            else:
                log.exception("training run %s failed", job.run_id)
                error = f"{type(exc).__name__}: {exc}"
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="failed", trainer=self.name, error=error))
        else:
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="done", trainer=self.name, record=record))
        finally:
            done.set()
            self.reporting.delete(alive)

    def report_epoch(self, job: training.TrainingJob, numbers: dict[str, float]) -> None:
        """Reports an epoch's numbers (``train_sketch.train``'s ``on_epoch``: epoch, seconds since
        the start, loss, accuracy, val_loss, val_accuracy) on the event stream, those that are not
        finite as None; then raises ``Diverged`` when the training loss is NaN or infinite, after
        the epoch is reported, so the run's history and progress count it."""
        epoch = int(numbers["epoch"])
        self.emit(
            training.TrainingEvent(
                run_id=job.run_id,
                kind="epoch",
                trainer=self.name,
                epoch=epoch,
                epochs=job.options.epochs,
                numbers=dict[str, float | None](numbers),
            )
        )
        loss = numbers.get("loss")
        if loss is not None and not math.isfinite(loss):
            became = "NaN" if math.isnan(loss) else "infinite"
            raise Diverged(f"diverged: the loss became {became} at epoch {epoch}; try a lower learning rate")

    def report_step(self, job: training.TrainingJob, progress: dict[str, float]) -> None:
        """Reports how far the epoch in progress is (``train_sketch.train``'s ``on_step``: epoch,
        step, steps, seconds since the start) on the event stream, as a ``progress`` event."""
        self.emit(
            training.TrainingEvent(
                run_id=job.run_id,
                kind="progress",
                trainer=self.name,
                epoch=int(progress["epoch"]),
                epochs=job.options.epochs,
                step=int(progress["step"]),
                steps=int(progress["steps"]),
                numbers={"seconds": progress["seconds"]},
            )
        )

    def train(self, job: training.TrainingJob, out: Path, feedback: Path | None) -> dict[str, object]:
        """Trains ``job`` into ``out`` (``train_sketch.train``), reporting each epoch and, every few
        seconds, the steps within one on the event stream; stopping within about a second once the
        run is cancelled or the trainer stops (``TrainingCancelled``, saying where: while preparing
        its data, part-way through an epoch, which is not reported, or while evaluating after its
        last), and failing it (``Diverged``) after the first epoch whose training loss is NaN or
        infinite. Raises ``train_sketch.CategoryUnavailable`` for a category neither in
        QUICKDRAW_DIR nor downloadable."""
        from model.training import train_sketch

        epochs = job.options.epochs
        return train_sketch.train(
            data=self.settings.quickdraw_dir,
            categories=job.categories,
            out=out,
            epochs=epochs,
            batch_size=job.options.batch_size,
            arch=job.options.arch,
            per_category=job.options.per_category,
            feedback=feedback if feedback is not None and feedback.is_dir() else None,
            learning_rate=job.options.learning_rate,
            seed=job.options.seed,
            canvas_share=job.options.canvas_share,
            augment=job.options.augment,
            flip_only=job.options.flip_only,
            label_smoothing=job.options.label_smoothing,
            weight_decay=job.options.weight_decay,
            warmup=job.options.warmup,
            mixed_precision=job.options.mixed_precision,
            flip_average=job.options.flip_average,
            # Keras' TerminateOnNaN stops within the epoch, but by ending fit as if it were over:
            # train_sketch would go on to evaluate the broken model, and the run would fail (if at
            # all) without a reason people can read. An exception from the epoch's callback ends
            # fit and the run with the reason, at most one epoch later.
            on_epoch=lambda numbers: self.report_epoch(job, numbers),
            on_step=lambda progress: self.report_step(job, progress),
            should_stop=lambda: bool(self.stopping.is_set() or self.reporting.exists(training.cancel_key(job.run_id))),
        )


def main() -> None:
    from model.logs import configure_logging

    settings = load_model_settings("model trainer")
    configure_logging(settings.log_level, settings.log_json)
    if settings.cpu_nice:
        os.nice(settings.cpu_nice)
    trainer = Trainer(settings)
    signal.signal(signal.SIGTERM, trainer.on_signal)
    signal.signal(signal.SIGINT, trainer.on_signal)
    for staging in remove_abandoned_staging(settings.trained_dir):
        log.warning("removed %s, left by a training that was killed", staging)
    log.info("trainer %s waiting for runs", trainer.name)
    trainer.run()


if __name__ == "__main__":
    main()
