"""A worker on its own: the models it serves, a job alone in the queue answered without waiting for
company, and one batch holding every kind of job settled in one step."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import redis
from PIL import Image

from contracts import keys, workers
from contracts.messages import FAILED_TO_LOAD, Heartbeat, JobMessage, ResultMessage
from model.config import ModelSettings
from model.worker import STOPPED_WORKER_MIN_IDLE_MS, Worker
from tests.images import encode
from tests.support import (
    PHOTOS,
    QUICK_STALL,
    ROOT,
    RedisServer,
    entries,
    hanging_until,
    model_health_passes,
    start_worker,
    streams_read,
    wait_for_worker,
    wait_until,
)


@pytest.fixture(scope="module")
def private_worker() -> Iterator[str]:
    server = RedisServer()
    server.start()
    worker = start_worker("latency-worker", server.url, SERVE_MODELS="mobilenet_v2@1")
    try:
        wait_for_worker(server.url, worker)
        yield server.url
    finally:
        worker.stop()
        server.stop()


@pytest.mark.serial
def test_a_lone_job_is_picked_up_at_once(private_worker: str) -> None:
    client = redis.Redis.from_url(private_worker)
    image = (PHOTOS / "parrot.jpg").read_bytes()
    last: bytes | str = "$"
    queue_ms = []
    for _ in range(8):
        job = JobMessage(
            job_id=str(uuid.uuid4()),
            prediction_id=str(uuid.uuid4()),
            model="mobilenet_v2",
            version=1,
            sha256="0" * 64,
            deadline=time.time() + 30,
            image=image,
        )
        if last == "$":
            newest = entries(client.xrevrange(keys.RESULT_STREAM, count=1))
            last = newest[0][0] if newest else "0-0"
        client.xadd(keys.job_stream("mobilenet_v2", 1), job.to_fields())
        response = streams_read(client.xread({keys.RESULT_STREAM: last}, count=1, block=10_000))
        assert response, "no result within 10 s"
        last, fields = response[0][1][0]
        result = ResultMessage.from_fields(fields)
        assert result.job_id == job.job_id and result.status == "done"
        assert result.timings is not None
        queue_ms.append(result.timings.queue_ms)
    # Redis answers a short BLOCK only on its next 100 ms tick; waiting for a fuller batch that
    # way cost a lone job tens of milliseconds. Taking what is already waiting costs about 1 ms.
    assert statistics.median(queue_ms) < 10, queue_ms


def test_a_worker_loads_and_announces_only_the_models_it_is_told(private_worker: str) -> None:
    client = redis.Redis.from_url(private_worker)
    beat = Heartbeat.model_validate_json(cast(bytes, client.get(keys.heartbeat_key("latency-worker"))))
    assert [(m.name, m.version, m.ready) for m in beat.models] == [("mobilenet_v2", 1, True)]
    assert client.zscore(workers.LIVE_WORKERS, "latency-worker") is not None


def test_a_worker_told_to_serve_an_unknown_model_stops_at_once_and_says_why(private_worker: str) -> None:
    env = {**os.environ, "REDIS_URL": private_worker, "SERVE_MODELS": "mobilenet_v2@1,nope", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "model"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "model worker refuses to start:"
            " SERVE_MODELS='mobilenet_v2@1,nope': 'nope' matches no model version served here; served: "
        )
    ), done.stderr[-3000:]


@pytest.fixture(scope="module")
def sketch_worker(model_settings: ModelSettings) -> Iterator[Worker]:
    """A worker in this process serving sketch@1 on a Redis of its own (no other worker takes its
    jobs), whose steps the test drives one by one."""
    server = RedisServer()
    server.start()
    settings = model_settings.model_copy(
        update={
            "redis_url": server.url,
            "serve_models": "sketch@1",
            "worker_id": "triage-worker",
            "visibility_timeout_ms": 50,
            "max_deliveries": 3,
        }
    )
    try:
        worker = Worker(settings)
        worker.load_models()
        worker.jobs.ensure_groups(worker.models)
        yield worker
    finally:
        server.stop()


def test_a_damaged_model_file_is_reported_as_failing_to_load_not_as_missing(
    sketch_worker: Worker, tmp_path: Path
) -> None:
    """A version whose file is there but does not load says so (``FAILED_TO_LOAD``, which users read
    as "failed to load"); one whose file is missing says it is not found."""
    entry = sketch_worker.models[keys.job_stream("sketch", 1)].entry
    labels = str(tmp_path / "labels.txt")
    damaged = entry.model_copy(update={"version": 91, "file": str(tmp_path / "damaged.keras"), "labels": labels})
    missing = entry.model_copy(update={"version": 92, "file": str(tmp_path / "missing.keras"), "labels": labels})
    (tmp_path / "damaged.keras").write_bytes(b"not a keras archive")
    (tmp_path / "labels.txt").write_text("\n".join(sketch_worker.models[keys.job_stream("sketch", 1)].labels))
    try:
        assert sketch_worker._load(damaged) is None and sketch_worker._load(missing) is None
        damaged_reason = sketch_worker.states[damaged.key].reason or ""
        missing_reason = sketch_worker.states[missing.key].reason or ""
        assert damaged_reason.startswith(f"{FAILED_TO_LOAD}: model file ") and "could not be loaded" in damaged_reason
        assert "no Keras archive" in damaged_reason and "not found" not in damaged_reason, damaged_reason
        assert not missing_reason.startswith(FAILED_TO_LOAD) and "not found" in missing_reason
    finally:
        sketch_worker._set_state(damaged, None)
        sketch_worker._set_state(missing, None)


def sketch_job(image: bytes, *, deadline_in: float = 60) -> JobMessage:
    return JobMessage(
        job_id=str(uuid.uuid4()),
        prediction_id=str(uuid.uuid4()),
        model="sketch",
        version=1,
        sha256="0" * 64,
        deadline=time.time() + deadline_in,
        image=image,
    )


def test_one_step_settles_each_kind_of_job_in_a_batch(sketch_worker: Worker) -> None:
    client = redis.Redis.from_url(sketch_worker.settings.redis_url)
    stream = keys.job_stream("sketch", 1)
    drawing = encode(Image.new("L", (280, 280), 255), "PNG")
    poison, good, late, unreadable = (
        sketch_job(drawing),
        sketch_job(drawing),
        sketch_job(drawing, deadline_in=-1),
        sketch_job(b"not an image"),
    )
    # Three workers took the poison job and stopped before answering.
    poison_id = client.xadd(stream, poison.to_fields())
    client.xreadgroup(keys.JOB_GROUP, "ghost-1", {stream: ">"})
    for ghost in ("ghost-2", "ghost-3"):
        client.xclaim(stream, keys.JOB_GROUP, ghost, min_idle_time=0, message_ids=[poison_id])
    # A worker took this one and stopped; it expired meanwhile.
    late_reclaimed = sketch_job(drawing, deadline_in=-1)
    client.xadd(stream, late_reclaimed.to_fields())
    client.xreadgroup(keys.JOB_GROUP, "ghost-4", {stream: ">"})
    time.sleep(0.1)
    for message in (good, late, unreadable):
        client.xadd(stream, message.to_fields())
    malformed_id = cast(bytes, client.xadd(stream, {"meta": b"{not json"}))
    before = sketch_worker.heartbeat()

    sketch_worker.step()

    answers = {
        r.job_id: r for r in (ResultMessage.from_fields(f) for _id, f in entries(client.xrange(keys.RESULT_STREAM)))
    }
    assert set(answers) == {poison.job_id, good.job_id, late.job_id, unreadable.job_id, late_reclaimed.job_id}
    assert (answers[late_reclaimed.job_id].status, answers[late_reclaimed.job_id].error) == (
        "expired",
        "deadline passed in the queue (taken over from a worker that stopped or hung; delivery 2)",
    )
    assert answers[good.job_id].status == "done" and len(answers[good.job_id].top_k) > 0
    assert answers[good.job_id].timings.batch_size == 1 and answers[good.job_id].worker_id == "triage-worker"
    assert (answers[late.job_id].status, answers[late.job_id].error) == ("expired", "deadline passed in the queue")
    assert answers[unreadable.job_id].status == "failed"
    assert (answers[unreadable.job_id].error or "").startswith("preprocessing failed")
    given_up = answers[poison.job_id]
    assert given_up.status == "failed" and given_up.dead_lettered and given_up.delivery == 1
    assert given_up.error == "gave up after 3 deliveries: the worker processing it stopped each time"
    dead = {fields[b"entry_id"]: fields for _id, fields in entries(client.xrange(keys.DEAD_LETTER_STREAM))}
    assert set(dead) == {poison_id, malformed_id}
    assert dead[malformed_id][b"reason"].startswith(b"malformed job message")
    assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0 and client.xlen(stream) == 0
    assert client.exists(keys.job_running_key(good.prediction_id), keys.job_running_key(unreadable.prediction_id)) == 2
    assert not client.exists(keys.job_running_key(late.prediction_id))
    # The good job reached the model: its inference's CPU time is counted.
    assert sketch_worker.heartbeat().inference_cpu_seconds > before.inference_cpu_seconds


def test_a_batch_job_waits_for_a_persons_next_job_and_never_for_ever(sketch_worker: Worker) -> None:
    """A batch job taken just after a person's job waits PEOPLE_ANTICIPATION_MS for that person's
    next one, which is answered first; under a steady stream of people's jobs it still runs after
    BATCH_MAX_DEFER_MS, and MAX_BATCH_SIZE of them run at once."""
    client = redis.Redis.from_url(sketch_worker.settings.redis_url)
    stream = keys.job_stream("sketch", 1)
    drawing = encode(Image.new("L", (280, 280), 255), "PNG")
    settings = sketch_worker.settings

    def answered() -> list[str]:
        return [ResultMessage.from_fields(f).job_id for _id, f in entries(client.xrange(keys.RESULT_STREAM))]

    def batch_job() -> JobMessage:
        return sketch_job(drawing).model_copy(update={"request_id": f"{keys.BATCH_REQUEST_PREFIX}test"})

    sketch_worker.settings = settings.model_copy(
        update={"people_anticipation_ms": 1000, "batch_max_defer_ms": 5000, "visibility_timeout_ms": 30_000}
    )
    try:
        first, second, bulk = sketch_job(drawing), sketch_job(drawing), batch_job()
        client.xadd(stream, first.to_fields())
        sketch_worker.step()
        client.xadd(stream, bulk.to_fields())
        sketch_worker.step()
        assert bulk.job_id not in answered()  # taken, held for the person's next job
        client.xadd(stream, second.to_fields())
        sketch_worker.step()
        time.sleep(1.0)
        sketch_worker.step()
        order = answered()
        assert order.index(first.job_id) < order.index(second.job_id) < order.index(bulk.job_id)

        sketch_worker.settings = sketch_worker.settings.model_copy(update={"batch_max_defer_ms": 300})
        deferred = batch_job()
        client.xadd(stream, sketch_job(drawing).to_fields())
        sketch_worker.step()
        client.xadd(stream, deferred.to_fields())
        held_at = time.monotonic()
        people = 0
        while deferred.job_id not in answered():
            assert time.monotonic() - held_at < 5, "the batch job waited for ever"
            client.xadd(stream, sketch_job(drawing).to_fields())
            people += 1
            sketch_worker.step()
        assert time.monotonic() - held_at >= 0.3 and people >= 3

        # A full batch of them is not held from peers that may be idle.
        sketch_worker.settings = sketch_worker.settings.model_copy(update={"batch_max_defer_ms": 5000})
        client.xadd(stream, sketch_job(drawing).to_fields())
        sketch_worker.step()
        full = [batch_job() for _ in range(sketch_worker.settings.max_batch_size)]
        for job in full:
            client.xadd(stream, job.to_fields())
        sketch_worker.step()
        assert {job.job_id for job in full} <= set(answered())
    finally:
        sketch_worker.settings = settings
    assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0


def test_a_held_batch_job_is_answered_once_after_a_stall_and_before_the_worker_stops(sketch_worker: Worker) -> None:
    """A batch job held while the worker stalls past VISIBILITY_TIMEOUT_MS (its version dropped
    and served again here) is taken back from the stream and answered once, not twice; one held
    that long is not answered from memory (a peer may have taken it over) but once taken back;
    and a worker told to stop answers the jobs it holds before it goes."""
    client = redis.Redis.from_url(sketch_worker.settings.redis_url)
    stream = keys.job_stream("sketch", 1)
    drawing = encode(Image.new("L", (280, 280), 255), "PNG")
    settings = sketch_worker.settings
    loaded = sketch_worker.models[stream]

    def answers(job: JobMessage) -> int:
        return sum(
            ResultMessage.from_fields(f).job_id == job.job_id for _id, f in entries(client.xrange(keys.RESULT_STREAM))
        )

    def hold(job: JobMessage) -> None:
        client.xadd(stream, sketch_job(drawing).to_fields())
        sketch_worker.step()
        client.xadd(stream, job.to_fields())
        sketch_worker.step()
        assert answers(job) == 0

    def batch_job() -> JobMessage:
        return sketch_job(drawing).model_copy(update={"request_id": f"{keys.BATCH_REQUEST_PREFIX}test"})

    sketch_worker.settings = settings.model_copy(
        update={"people_anticipation_ms": 10_000, "batch_max_defer_ms": 10_000, "visibility_timeout_ms": 1000}
    )
    try:
        # The version dropped while a job of it is held, then served again after the timeout.
        stalled = batch_job()
        hold(stalled)
        sketch_worker._outgoing.add(stream)
        sketch_worker.apply_changes()
        time.sleep(1.2)
        sketch_worker._incoming[stream] = loaded
        sketch_worker.apply_changes()
        sketch_worker._last_reclaim = 0.0
        sketch_worker.step()
        assert answers(stalled) == 1

        # Held past the timeout without being taken back: left pending, then answered once taken back.
        left = batch_job()
        hold(left)
        time.sleep(1.2)
        sketch_worker._last_reclaim = time.monotonic()
        sketch_worker.step()
        assert answers(left) == 0 and client.xpending(stream, keys.JOB_GROUP)["pending"] == 1
        sketch_worker._last_reclaim = 0.0
        sketch_worker.step()  # taken back, and held again for at most half the timeout
        time.sleep(0.6)
        sketch_worker.step()
        assert answers(left) == 1

        # Told to stop while holding one: answered before the worker goes.
        last = batch_job()
        hold(last)
        sketch_worker.stopping.set()
        sketch_worker.run()
        assert answers(last) == 1
    finally:
        sketch_worker.stopping.clear()
        sketch_worker.settings = settings
        sketch_worker.send_heartbeat()
    assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0


def test_one_dict_holds_the_loaded_models_by_the_stream_they_serve(sketch_worker: Worker) -> None:
    (stream, model), *others = sketch_worker.models.items()
    assert not others and stream == keys.job_stream("sketch", 1) and model.entry.key == "sketch@1"


def test_a_restarted_worker_takes_back_its_own_jobs_and_a_stopped_workers_at_once(sketch_worker: Worker) -> None:
    """Long before VISIBILITY_TIMEOUT_MS: the jobs held under its own name (by the process it
    replaces) and those of a worker whose heartbeat is gone, in its first step."""
    client = redis.Redis.from_url(sketch_worker.settings.redis_url)
    stream = keys.job_stream("sketch", 1)
    drawing = encode(Image.new("L", (280, 280), 255), "PNG")
    own, orphan = sketch_job(drawing), sketch_job(drawing)
    client.xadd(stream, own.to_fields())
    client.xreadgroup(keys.JOB_GROUP, sketch_worker.worker_id, {stream: ">"}, count=1)
    client.xadd(stream, orphan.to_fields())
    client.xreadgroup(keys.JOB_GROUP, "stopped-worker", {stream: ">"}, count=1)
    time.sleep(STOPPED_WORKER_MIN_IDLE_MS / 1000 + 0.1)
    restarted = Worker(sketch_worker.settings.model_copy(update={"visibility_timeout_ms": 600_000}))
    restarted.load_models()

    restarted.step()

    answers = {
        r.job_id: r for r in (ResultMessage.from_fields(f) for _id, f in entries(client.xrange(keys.RESULT_STREAM)))
    }
    assert answers[own.job_id].status == answers[orphan.job_id].status == "done"
    assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0


def test_a_job_delivered_as_redis_goes_away_is_taken_back_at_once_after_the_reconnect(tmp_path: Path) -> None:
    """Redis stops (its data kept) just after it delivered a job to a running worker, whose reply
    is lost: the job stays pending under the worker's own name, and the worker takes it back as
    soon as it reconnects, not after VISIBILITY_TIMEOUT_MS (one call's deadline)."""
    server = RedisServer("--appendonly", "yes", "--dir", str(tmp_path))
    server.start()
    name = f"reconnecting-owner-{time.monotonic_ns()}"
    worker = start_worker(name, server.url, SERVE_MODELS="sketch@1", VISIBILITY_TIMEOUT_MS="600000")
    try:
        wait_for_worker(server.url, worker)
        client = redis.Redis.from_url(server.url)
        stream = keys.job_stream("sketch", 1)
        job = sketch_job(encode(Image.new("L", (280, 280), 255), "PNG"))
        # Added and delivered under the worker's name at once: as a delivery whose reply was lost.
        with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, job.to_fields())
            pipe.xreadgroup(keys.JOB_GROUP, name, {stream: ">"}, count=1)
            pipe.execute()
        server.stop()
        time.sleep(1.5)  # the worker sees the outage
        server.start()
        client = redis.Redis.from_url(server.url)
        assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 1  # kept by the append-only file

        def answered() -> bool:
            if not worker.alive():
                raise RuntimeError(f"worker {name} exited:\n{worker.log()[-3000:]}")
            return any(
                ResultMessage.from_fields(f).job_id == job.job_id
                for _id, f in entries(client.xrange(keys.RESULT_STREAM))
            )

        wait_until(answered, 15, "the job delivered as Redis went away to be answered")
        assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0
    finally:
        worker.stop()
        server.stop()


def test_a_worker_whose_serving_loop_hangs_lets_its_heartbeat_lapse_and_beats_again_once_it_runs(
    model_settings: ModelSettings,
) -> None:
    """An inference that hangs while the heartbeat thread runs: within SERVING_STALL_S plus the
    heartbeat's TTL the worker is no longer live (its jobs go to peers, ``model.health`` fails, so
    a liveness probe restarts it), where a thread of its own kept it announced for good. Once the
    inference returns, the job is answered and the worker is live again."""
    server = RedisServer()
    server.start()
    settings = model_settings.model_copy(
        update={
            "redis_url": server.url,
            "serve_models": "sketch@1",
            "worker_id": f"hanging-worker-{time.monotonic_ns()}",
            **QUICK_STALL,
        }
    )
    worker = Worker(settings)
    worker.load_models()
    [loaded] = worker.models.values()
    release = threading.Event()
    loaded.classify = hanging_until(release, loaded.classify)
    serving = threading.Thread(target=worker.run, name="serving", daemon=True)
    client = redis.Redis.from_url(server.url)

    def live() -> bool:
        return any(beat.worker_id == settings.worker_id for beat in workers.live_heartbeats(client))

    def healthy() -> bool:
        return model_health_passes(server.url, settings.worker_id)

    try:
        serving.start()
        wait_until(live, 30, "the worker to announce itself")
        assert healthy()
        job = sketch_job(encode(Image.new("L", (280, 280), 255), "PNG"))
        client.xadd(keys.job_stream("sketch", 1), job.to_fields())
        wait_until(lambda: not live(), 10, "the hung worker's heartbeat to lapse")
        assert not healthy()
        release.set()

        def answered() -> bool:
            return any(
                ResultMessage.from_fields(f).job_id == job.job_id
                for _id, f in entries(client.xrange(keys.RESULT_STREAM))
            )

        wait_until(answered, 30, "the job to be answered once the inference returned")
        wait_until(live, 10, "the worker to announce itself again")
    finally:
        release.set()
        worker.stopping.set()
        serving.join(30)
        server.stop()
