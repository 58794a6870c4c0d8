"""The training worker's loop with entries it cannot read."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
from PIL import Image

from bench.processes import Service
from contracts import training
from model.config import ModelSettings
from model.store import version_lock
from model.trainer import STOPPED, Trainer
from model.training import train_sketch
from tests.support import RedisServer, service, wait_until


def settings_for(model_settings: ModelSettings, server: RedisServer, trained_dir: Path | None = None) -> ModelSettings:
    """The suite's model settings pointed at a private Redis (and a model store of the test's)."""
    update: dict[str, object] = {"redis_url": server.url, "worker_id": "trainer-test"}
    if trained_dir is not None:
        update["trained_dir"] = trained_dir
    return model_settings.model_copy(update=update)


@contextmanager
def looping(trainer: Trainer, join_s: float = 10) -> Iterator[threading.Thread]:
    """The trainer's loop in a thread for the block; stopped and joined after it."""
    loop = threading.Thread(target=trainer.run, daemon=True)
    loop.start()
    try:
        yield loop
    finally:
        trainer.stop()
        loop.join(join_s)


def two_class_job(run_id: str, version: int) -> training.TrainingJob:
    """A run whose training the test's Trainer subclass stands in for, or that never starts."""
    return training.TrainingJob(
        run_id=run_id, model="sketch", version=version, categories=["cat", "fish"], options=training.TrainingOptions()
    )


def minute_long_job(model_settings: ModelSettings, run_id: str) -> training.TrainingJob:
    """A real run of one epoch of about a minute (30 s on a fast host): a signal sent a few seconds
    into it comes long before the epoch ends."""
    options = training.TrainingOptions(arch="vgg", epochs=1, per_category=3000, batch_size=16)
    categories = sorted(p.stem for p in model_settings.quickdraw_dir.glob("*.npy"))[:10]
    return training.TrainingJob(run_id=run_id, model="sketch", version=5, categories=categories, options=options)


def trainer_process(name: str, server: RedisServer, model_settings: ModelSettings, trained_dir: Path) -> Service:
    """``python -m model.trainer`` as supervisord and Kubernetes start it."""
    env = {
        "REDIS_URL": server.url,
        "WORKER_ID": name,
        "TRAINED_DIR": str(trained_dir),
        "QUICKDRAW_DIR": str(model_settings.quickdraw_dir),
        "LOG_JSON": "true",
    }
    return service(name, [sys.executable, "-m", "model.trainer"], env)


def test_a_run_with_an_option_the_trainer_does_not_know_fails_and_the_trainer_goes_on(
    private_redis: RedisServer, model_settings: ModelSettings
) -> None:
    r = redis.Redis.from_url(private_redis.url)
    options = training.TrainingOptions().model_dump() | {"ema_decay": 0.999}  # a newer API's option
    unknown = {"run_id": "from-a-newer-api", "model": "sketch", "version": 9, "categories": ["cat"], "options": options}
    r.xadd(training.JOB_STREAM, {"meta": json.dumps(unknown).encode()})
    r.xadd(training.JOB_STREAM, {"meta": b"not json"})
    trainer = Trainer(settings_for(model_settings, private_redis))
    with looping(trainer) as loop:
        deadline = time.monotonic() + 30
        while not r.exists(training.EVENT_STREAM) or not r.xlen(training.EVENT_STREAM):
            assert time.monotonic() < deadline, "no event for the unreadable run"
            time.sleep(0.1)
        [(_, fields)] = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(training.EVENT_STREAM))
        event = training.TrainingEvent.model_validate_json(fields[b"meta"])
        assert (event.run_id, event.kind) == ("from-a-newer-api", "failed")
        assert event.error is not None and "ema_decay" in event.error
        # Both entries are taken, and the loop still reads the stream.
        time.sleep(1.5)
        assert loop.is_alive() and r.xpending(training.JOB_STREAM, training.JOB_GROUP)["pending"] == 0
        assert r.xinfo_groups(training.JOB_STREAM)[0]["entries-read"] == 2


def test_the_liveness_key_is_renewed_again_after_redis_comes_back(
    private_redis: RedisServer, model_settings: ModelSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis restart during a run: the renewals go on once it is back. The first error used to
    end them, and the API then failed the live run as one whose trainer stopped."""
    monkeypatch.setattr(training, "ALIVE_TTL_S", 3)  # a renewal every second
    r = redis.Redis.from_url(private_redis.url)
    trainer = Trainer(settings_for(model_settings, private_redis))
    done = threading.Event()
    beats = threading.Thread(target=trainer.keep_alive, args=("blip", done), daemon=True)
    beats.start()
    try:
        wait_until(lambda: bool(r.exists(training.alive_key("blip"))), 10, "the first renewal")
        private_redis.stop()
        time.sleep(2.5)  # two renewals fail
        private_redis.start()
        wait_until(lambda: bool(r.exists(training.alive_key("blip"))), 10, "a renewal after the restart")
        assert beats.is_alive()
    finally:
        done.set()
        beats.join(5)


def events_of(
    r: redis.Redis, count: int, within: float = 30, *, progress: bool = False
) -> list[training.TrainingEvent]:
    """The run events on the stream once there are ``count``; without ``progress``, the steps
    within epochs (reported every few seconds, so as many as the training took time) are left out,
    counted or not."""
    deadline = time.monotonic() + within
    while True:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], r.xrange(training.EVENT_STREAM))
        events = [training.TrainingEvent.model_validate_json(fields[b"meta"]) for _, fields in entries]
        events = [e for e in events if progress or e.kind != "progress"]
        if len(events) >= count:
            return events
        assert time.monotonic() < deadline, f"fewer than {count} training events"
        time.sleep(0.1)


def test_a_run_never_writes_a_version_another_process_writes_or_that_exists(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """registry.yaml may name the version a run was given: while ``model.prepare`` trains it (its
    lock is held) or once its model file exists, the run fails with the reason and writes nothing."""
    r = redis.Redis.from_url(private_redis.url)
    existing = tmp_path / "sketch" / "v7" / "model.keras"
    existing.parent.mkdir(parents=True)
    existing.write_bytes(b"a served model")
    locked = tmp_path / "sketch" / "v8" / "model.keras"
    for run_id, version in (("exists", 7), ("locked", 8)):
        r.xadd(training.JOB_STREAM, two_class_job(run_id, version).to_fields())
    with version_lock(locked, "sketch@8", wait=False) as held:
        assert held
        with looping(Trainer(settings_for(model_settings, private_redis, tmp_path))):
            events = [e for e in events_of(r, 4) if e.kind != "started"]
    assert [(e.run_id, e.kind) for e in events] == [("exists", "failed"), ("locked", "failed")]
    assert "model file in the model store already" in str(events[0].error), events[0].error
    assert not str(events[0].error).startswith("VersionTaken"), events[0].error  # people read it
    assert "another process" in str(events[1].error), events[1].error
    assert str(tmp_path) not in str(events[0].error)  # people read it: no server paths
    assert existing.read_bytes() == b"a served model"
    assert sorted(p.name for p in locked.parent.iterdir()) == [".model.keras.lock"]


def test_records_are_published_and_a_folder_name_that_is_not_utf8_is_skipped(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """The API numbers runs after the versions found in the model store (``training.RECORDS_KEY``):
    a folder Redis cannot name (not UTF-8) is skipped, never the end of the trainer's scan."""
    for folder in (b"sketch/v4", b"sketch/v\xff", b"\xffsketch/v9"):
        path = tmp_path / Path(folder.decode("utf-8", "surrogateescape"))
        path.mkdir(parents=True)
        (path / "metrics.json").write_text('{"test_accuracy": 0.9}', encoding="utf-8")
    r = redis.Redis.from_url(private_redis.url)
    trainer = Trainer(settings_for(model_settings, private_redis, tmp_path))
    trainer.publish_records()
    assert r.hkeys(training.RECORDS_KEY) == [b"sketch/v4"]


def test_a_trainer_stopped_mid_epoch_exits_at_once_and_fails_its_run_keeping_nothing(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """supervisord and Kubernetes stop the trainer with SIGTERM and kill it after a grace period:
    it stops within a training step, not at the end of an epoch that may take minutes, fails the
    run with the reason and leaves no half-written version."""
    r = redis.Redis.from_url(private_redis.url)
    r.xadd(training.JOB_STREAM, minute_long_job(model_settings, "stopped").to_fields())
    # What a trainer killed by SIGKILL while writing version 4 left: the next one removes it.
    abandoned = tmp_path / "sketch" / "v4" / ".model.keras.partial"
    abandoned.mkdir(parents=True)
    (abandoned / "model.keras").write_bytes(b"half a model")
    (abandoned.parent / ".model.keras.lock").touch()
    trainer = trainer_process("trainer-stopped", private_redis, model_settings, tmp_path)
    try:
        assert [e.kind for e in events_of(r, 1, within=60)] == ["started"]
        staging = tmp_path / "sketch" / "v5" / ".model.keras.partial"
        wait_until(staging.is_dir, 60, "the run training")
        time.sleep(3)  # loading the drawings or into Keras' fit: either way long before the epoch ends
        trainer.proc.send_signal(signal.SIGTERM)
        assert trainer.proc.wait(15) == 0
    finally:
        trainer.kill()
    events = events_of(r, 2)
    assert [(e.run_id, e.kind, e.error) for e in events[1:]] == [("stopped", "failed", STOPPED)]
    # Nothing of version 5 is left, not even its lock file or an empty folder.
    assert not (tmp_path / "sketch" / "v5").exists()
    assert not r.exists(training.alive_key("stopped"))
    assert not abandoned.parent.exists()  # the killed run's version folder, lock file and all


class CancelledWhileKept(Trainer):
    """Stands in for a training whose last epoch is over: it writes the model file into its staging
    folder, and an admin's cancel arrives while that happens (the evaluation after the last epoch)."""

    def train(self, job: training.TrainingJob, out: Path, feedback: Path | None) -> dict[str, object]:
        (out / "model.keras").write_bytes(b"a trained model")
        self.redis.set(training.cancel_key(job.run_id), "1")
        return {"test_accuracy": 0.5}


def test_a_run_cancelled_after_its_last_epoch_is_cancelled_and_keeps_nothing(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(private_redis.url)
    r.xadd(training.JOB_STREAM, two_class_job("late-cancel", 9).to_fields())
    with looping(CancelledWhileKept(settings_for(model_settings, private_redis, tmp_path))):
        events = events_of(r, 2)
    assert [(e.run_id, e.kind) for e in events] == [("late-cancel", "started"), ("late-cancel", "cancelled")]
    assert "after its last epoch" in str(events[1].error)
    assert not (tmp_path / "sketch" / "v9").exists()


class CancelledMidEpoch(Trainer):
    """A real training whose admin cancels it once the second epoch has reported its second step."""

    def report_step(self, job: training.TrainingJob, progress: dict[str, float]) -> None:
        super().report_step(job, progress)
        if (progress["epoch"], progress["step"]) == (2, 2):
            self.redis.set(training.cancel_key(job.run_id), "1")


def test_a_run_cancelled_mid_epoch_stops_there_reporting_its_steps_and_no_part_of_the_epoch(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel was seen only once the epoch and its validation were over (40 s to minutes): the run
    reports its steps within each epoch and stops within the one it is cancelled in, which it does
    not report as an epoch, keeping nothing."""
    monkeypatch.setattr(train_sketch, "STOP_CHECK_EVERY_S", 0.0)  # each step: a few of milliseconds here
    monkeypatch.setattr(train_sketch, "PROGRESS_EVERY_S", 0.0)
    categories = sorted(p.stem for p in model_settings.quickdraw_dir.glob("*.npy"))[:2]
    options = training.TrainingOptions(epochs=3, per_category=40, batch_size=16, canvas_share=0.0)
    job = training.TrainingJob(run_id="mid", model="sketch", version=9, categories=categories, options=options)
    r = redis.Redis.from_url(private_redis.url)
    CancelledMidEpoch(settings_for(model_settings, private_redis, tmp_path)).train_one(job)
    events = events_of(r, 3, progress=True)
    steps = int(events[1].steps)
    assert steps >= 3 and all(e.steps == steps for e in events if e.kind == "progress"), events
    said = [(e.kind, e.epoch, e.step) for e in events]
    assert said == [
        ("started", 0, 0),
        *(("progress", 1, n) for n in range(1, steps + 1)),
        ("epoch", 1, 0),
        ("progress", 2, 1),
        ("progress", 2, 2),
        ("cancelled", 0, 0),
    ], said
    assert events[-1].error == f"cancelled during epoch 2 of 3, after step 3 of {steps}"
    assert all(e.epochs == 3 and e.numbers["seconds"] is not None for e in events if e.kind == "progress")
    assert not (tmp_path / "sketch" / "v9").exists()
    assert r.get(training.ended_key("mid")) == b"cancelled" and not r.exists(training.alive_key("mid"))


class RedisOutAtEpochEnd(Trainer):
    """Stands in for a training whose epoch ends while Redis is out of reach for a few seconds
    (restarted, a network blip), shorter than the liveness key lives: the epoch's report and the
    cancel check wait for Redis, and the run ends as trained."""

    outage: RedisServer

    def train(self, job: training.TrainingJob, out: Path, feedback: Path | None) -> dict[str, object]:
        (out / "model.keras").write_bytes(b"a trained model")
        self.outage.stop()
        back = threading.Timer(5, self.outage.start)
        back.start()
        try:
            self.emit(training.TrainingEvent(run_id=job.run_id, kind="epoch", trainer=self.name, epoch=1, epochs=1))
            assert not self.redis.exists(training.cancel_key(job.run_id))
        finally:
            back.join()
        return {"test_accuracy": 0.5}


def test_a_redis_outage_at_an_epochs_end_is_waited_out_and_the_run_ends_as_trained(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """An epoch's report met a Redis outage of 5 s: the run failed with the connection error, its
    failure could not be reported either, and the API then blamed a trainer that never stopped."""
    r = redis.Redis.from_url(private_redis.url)
    r.xadd(training.JOB_STREAM, two_class_job("blip", 9).to_fields())
    trainer = RedisOutAtEpochEnd(settings_for(model_settings, private_redis, tmp_path))
    trainer.outage = private_redis
    with looping(trainer, join_s=30):
        # This Redis keeps nothing across a restart: what the trainer reports after it is there.
        wait_until(lambda: (tmp_path / "sketch" / "v9" / "model.keras").exists(), 60, "the run kept")
        events = events_of(r, 2)
    assert [(e.run_id, e.kind) for e in events] == [("blip", "epoch"), ("blip", "done")]
    assert r.get(training.ended_key("blip")) == b"done"


@pytest.mark.parametrize("training_a_run", [False, True], ids=["idle", "training"])
def test_a_trainer_stopped_while_redis_is_down_exits_within_a_grace_period(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path, training_a_run: bool
) -> None:
    """SIGTERM while Redis is out of reach: the trainer gives up waiting for Redis and exits
    within docker's default grace period of 10 s. Its patient retries made it take 21 s idle and
    51 s during a run, long enough to be SIGKILLed by supervisord or docker."""
    r = redis.Redis.from_url(private_redis.url)
    if training_a_run:
        r.xadd(training.JOB_STREAM, minute_long_job(model_settings, "down").to_fields())
    trainer = trainer_process("trainer-down", private_redis, model_settings, tmp_path)
    try:
        if training_a_run:
            wait_until((tmp_path / "sketch" / "v5" / ".model.keras.partial").is_dir, 60, "the run training")
        else:
            wait_until(lambda: bool(r.exists(training.JOB_STREAM)), 30, "the trainer waiting for runs")
        private_redis.stop()
        time.sleep(2)
        trainer.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        trainer.proc.wait(30)
        assert time.monotonic() - started < 10, trainer.log()[-2000:]
    finally:
        trainer.kill()
    assert not (tmp_path / "sketch" / "v5").exists() or not (tmp_path / "sketch" / "v5" / "model.keras").exists()


def test_a_run_whose_exported_feedback_is_not_on_the_trainer_fails_saying_why(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """The API exports a run's feedback examples under TRAINING_DATA_DIR, which the trainer must
    share: a trainer that cannot see them fails the run with the reason. It used to train on
    QuickDraw alone, and the run looked like one on the users' labels."""
    r = redis.Redis.from_url(private_redis.url)
    job = two_class_job("unshared", 9).model_copy(update={"feedback_dir": str(tmp_path / "training" / "unshared")})
    r.xadd(training.JOB_STREAM, job.to_fields())
    with looping(Trainer(settings_for(model_settings, private_redis, tmp_path / "store"))):
        events = events_of(r, 2)
    assert [(e.run_id, e.kind) for e in events] == [("unshared", "started"), ("unshared", "failed")]
    assert "TRAINING_DATA_DIR" in str(events[1].error), events[1].error
    assert not (tmp_path / "store" / "sketch" / "v9").exists()


def test_a_run_whose_loss_becomes_nan_records_the_epoch_and_fails_saying_why(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path
) -> None:
    """A diverged epoch's NaN loss reached the API as null, which it refused: the epoch was
    dropped (progress and ETA went wrong) and the run trained on to its last epoch for nothing.
    The epoch is reported with its non-finite numbers as None, and the run stops there, failed
    with the reason."""
    categories = sorted(p.stem for p in model_settings.quickdraw_dir.glob("*.npy"))[:2]
    # A learning rate of NaN (which the API refuses: the job is handed to train_one directly) makes
    # the weights NaN at the first step, so a real run's loss is NaN from its first epoch on.
    options = training.TrainingOptions.model_construct(
        **(training.TrainingOptions(epochs=3, per_category=40, batch_size=16, canvas_share=0.0).model_dump())
        | {"learning_rate": float("nan")}
    )
    job = training.TrainingJob(run_id="nan", model="sketch", version=9, categories=categories, options=options)
    r = redis.Redis.from_url(private_redis.url)
    Trainer(settings_for(model_settings, private_redis, tmp_path)).train_one(job)
    events = events_of(r, 3)
    assert [(e.kind, e.epoch, e.epochs) for e in events] == [("started", 0, 3), ("epoch", 1, 3), ("failed", 0, 0)]
    numbers = events[1].numbers
    assert numbers["loss"] is None and numbers["val_loss"] is None, numbers
    assert numbers["epoch"] == 1 and numbers["seconds"] is not None and numbers["seconds"] > 0, numbers
    assert events[2].error == "diverged: the loss became NaN at epoch 1; try a lower learning rate"
    assert not (tmp_path / "sketch" / "v9").exists()
    assert r.get(training.ended_key("nan")) == b"failed" and not r.exists(training.alive_key("nan"))


def cancelled_on_first_drawing(monkeypatch: pytest.MonkeyPatch, r: redis.Redis, run_id: str) -> list[float]:
    """Makes the run's first drawing as the canvas does (``train_sketch.canvas_image``) cancel it, as
    an admin would; the moments (``time.monotonic``) it drew at."""
    drawn: list[float] = []
    draw = train_sketch.canvas_image

    def drawing(bitmap: np.ndarray) -> Image.Image:
        if not drawn:
            r.set(training.cancel_key(run_id), "1")
        drawn.append(time.monotonic())
        return draw(bitmap)

    monkeypatch.setattr(train_sketch, "canvas_image", drawing)
    return drawn


def test_a_run_cancelled_while_preparing_its_data_stops_there_saying_so(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel sent while the run read its drawings and drew them as the canvas does (14 to 22 s
    for 20 categories) took effect only at the first training step, and its error said "cancelled
    during epoch 1 of 1, after step 1 of 751" although no step had been trained."""
    categories = sorted(p.stem for p in model_settings.quickdraw_dir.glob("*.npy"))[:2]
    options = training.TrainingOptions(epochs=1, per_category=1000, batch_size=16, canvas_share=1.0)
    job = training.TrainingJob(run_id="early", model="sketch", version=9, categories=categories, options=options)
    r = redis.Redis.from_url(private_redis.url)
    drawn = cancelled_on_first_drawing(monkeypatch, r, "early")
    Trainer(settings_for(model_settings, private_redis, tmp_path)).train_one(job)
    ended = time.monotonic()
    events = events_of(r, 2, progress=True)
    assert [(e.kind, e.error) for e in events] == [
        ("started", None),
        ("cancelled", "cancelled while preparing its data"),
    ]
    assert ended - drawn[0] < 2.5  # STOP_CHECK_EVERY_S, and the chunk of drawings in progress
    assert not (tmp_path / "sketch" / "v9").exists()
    assert r.get(training.ended_key("early")) == b"cancelled" and not r.exists(training.alive_key("early"))


def test_a_run_cancelled_while_evaluating_stops_there_saying_so(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel sent after the last epoch was applied only once the evaluation on the held-out sets
    (30 to 40 s for the VGG recipe) was over; it is seen while they are evaluated. Without canvas
    copies in training, the first drawing as the canvas does is the held-out set's."""
    categories = sorted(p.stem for p in model_settings.quickdraw_dir.glob("*.npy"))[:2]
    options = training.TrainingOptions(epochs=1, per_category=40, batch_size=16, canvas_share=0.0)
    job = training.TrainingJob(run_id="late", model="sketch", version=9, categories=categories, options=options)
    r = redis.Redis.from_url(private_redis.url)
    drawn = cancelled_on_first_drawing(monkeypatch, r, "late")
    Trainer(settings_for(model_settings, private_redis, tmp_path)).train_one(job)
    ended = time.monotonic()
    events = events_of(r, 3)
    said = [(e.kind, e.epoch, e.error) for e in events]
    assert said == [
        ("started", 0, None),
        ("epoch", 1, None),
        ("cancelled", 0, "cancelled while evaluating, after its last epoch"),
    ]
    assert ended - drawn[0] < 2.5
    assert not (tmp_path / "sketch" / "v9").exists()


def test_a_run_on_a_category_not_in_quickdraw_dir_nor_downloadable_fails_saying_which(
    private_redis: RedisServer, model_settings: ModelSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base version registered by hand with a label QUICKDRAW_DIR lacks ("giraffe"): its run
    failed with "URLError: <urlopen error [Errno -2] Name or service not known>", naming neither
    the category, nor the file, nor where it was to come from."""
    monkeypatch.setattr(train_sketch, "QUICKDRAW_URL", "http://127.0.0.1:9/{category}.npy")  # nothing listens
    data = tmp_path / "quickdraw"
    data.mkdir()
    (data / "cat.npy").symlink_to(model_settings.quickdraw_dir / "cat.npy")
    options = training.TrainingOptions(epochs=1, per_category=40, batch_size=16)
    job = training.TrainingJob(
        run_id="giraffe", model="sketch", version=9, categories=["cat", "giraffe"], options=options
    )
    r = redis.Redis.from_url(private_redis.url)
    settings = settings_for(model_settings, private_redis, tmp_path / "store").model_copy(
        update={"quickdraw_dir": data}
    )
    Trainer(settings).train_one(job)
    events = events_of(r, 2)
    assert [e.kind for e in events] == ["started", "failed"]
    assert events[1].error == (
        f"category 'giraffe' is not in QUICKDRAW_DIR ({data / 'giraffe.npy'} is missing) and could not be "
        "downloaded from http://127.0.0.1:9/giraffe.npy: [Errno 111] Connection refused"
    )
    assert sorted(p.name for p in data.iterdir()) == ["cat.npy"]
    assert not (tmp_path / "store" / "sketch" / "v9").exists()
