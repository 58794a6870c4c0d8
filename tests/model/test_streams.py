"""The worker's side of the job streams against a real Redis: reading, reclaiming with delivery
counts, and publishing answers with the acknowledgements and dead letters they settle."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import cast

import pytest
import redis

from contracts import keys
from contracts.messages import JobMessage, PredictionStatus, ResultMessage
from model.streams import DeadLetter, JobStreams, decode
from tests.support import RedisServer, entries


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """A Redis of its own: these tests write the result and dead-letter streams other tests read."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(private_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(private_redis.url)
    client.flushdb()
    yield client
    client.close()


def fresh_stream() -> str:
    return keys.job_stream(f"m{uuid.uuid4().hex[:8]}", 1)


def job(**fields: object) -> JobMessage:
    values: dict[str, object] = {
        "job_id": str(uuid.uuid4()),
        "prediction_id": str(uuid.uuid4()),
        "model": "m",
        "version": 1,
        "sha256": "0" * 64,
        "deadline": time.time() + 60,
        "image": b"pixels",
        **fields,
    }
    return JobMessage.model_validate(values)


def test_decode_keeps_a_malformed_entry_as_a_delivery_without_a_job() -> None:
    good = job()
    written = cast(dict[str, bytes], good.to_fields())  # a job's field names are str, its values bytes
    as_read = {name.encode(): value for name, value in written.items()}
    deliveries = decode("s", [(b"1-0", as_read), (b"2-0", {b"meta": b"{not json"})])
    assert deliveries[0].job == good and deliveries[0].job.image == b"pixels" and deliveries[0].error is None
    assert deliveries[1].job is None and deliveries[1].error is not None
    assert deliveries[1].error.startswith("malformed job message")


def test_read_gives_each_new_job_once_by_stream(client: redis.Redis) -> None:
    a, b = fresh_stream(), fresh_stream()
    jobs = JobStreams(client, "w1")
    jobs.ensure_groups([a, b])
    first, second, other = job(), job(), job()
    for stream, message in ((a, first), (a, second), (b, other)):
        client.xadd(stream, message.to_fields())
    got = jobs.read([a, b], count=10)
    assert {s: [d.job for d in ds] for s, ds in got.items()} == {a: [first, second], b: [other]}
    assert all(d.delivery == 1 and d.stream == s for s, ds in got.items() for d in ds)
    assert jobs.read([a, b], count=10) == {}
    assert JobStreams(client, "w2").read([a, b], count=10) == {}  # the group delivered them already


def test_read_takes_at_most_count_per_stream(client: redis.Redis) -> None:
    stream = fresh_stream()
    jobs = JobStreams(client, "w1")
    jobs.ensure_groups([stream])
    for _ in range(3):
        client.xadd(stream, job().to_fields())
    assert len(jobs.read([stream], count=2)[stream]) == 2
    assert len(jobs.read([stream], count=2)[stream]) == 1


def test_waiting_counts_only_the_jobs_no_worker_holds(client: redis.Redis) -> None:
    stream = fresh_stream()
    jobs = JobStreams(client, "w1")
    jobs.ensure_groups([stream])
    for _ in range(5):
        client.xadd(stream, job().to_fields())
    assert jobs.waiting(stream) == 5
    jobs.read([stream], count=2)
    assert jobs.waiting(stream) == 3


def test_reclaim_takes_over_idle_jobs_with_their_delivery_counts(client: redis.Redis) -> None:
    stream = fresh_stream()
    jobs = JobStreams(client, "survivor")
    jobs.ensure_groups([stream])
    twice, once, fresh = job(), job(), job()
    twice_id = client.xadd(stream, twice.to_fields())
    client.xadd(stream, once.to_fields())
    JobStreams(client, "dead-1").read([stream], count=2)
    client.xclaim(stream, keys.JOB_GROUP, "dead-2", min_idle_time=0, message_ids=[twice_id])
    time.sleep(0.05)
    client.xadd(stream, fresh.to_fields())
    JobStreams(client, "busy").read([stream], count=1)  # delivered just now: not idle long enough

    reclaimed = jobs.reclaim(stream, min_idle_ms=40, count=10)
    assert sorted((d.job.job_id, d.delivery) for d in reclaimed if d.job) == sorted(
        [(twice.job_id, 3), (once.job_id, 2)]
    )
    consumers = {c["name"]: c["pending"] for c in client.xinfo_consumers(stream, keys.JOB_GROUP)}
    assert consumers[b"survivor"] == 2 and consumers[b"busy"] == 1


def test_a_stopped_workers_jobs_are_taken_over_once_its_heartbeat_is_gone(client: redis.Redis) -> None:
    """Jobs held by a worker whose heartbeat expired are taken over after a moment, long before
    the visibility timeout; those of a live worker stay; a worker's own name counts only when
    asked (a new process under the name of one that stopped); the stopped stay in the group."""
    stream = fresh_stream()
    survivor = JobStreams(client, "survivor")
    survivor.ensure_groups([stream])
    assert survivor.reclaim_from_stopped(fresh_stream(), min_idle_ms=0, count=10) == []  # no such stream (yet)
    client.set(keys.heartbeat_key("survivor"), b"{}")
    client.set(keys.heartbeat_key("alive"), b"{}")
    held, kept, left = job(), job(), job()
    client.xadd(stream, held.to_fields())
    JobStreams(client, "stopped").read([stream], count=1)
    client.xadd(stream, kept.to_fields())
    JobStreams(client, "alive").read([stream], count=1)
    client.xadd(stream, left.to_fields())
    JobStreams(client, "survivor").read([stream], count=1)  # by an earlier process of that name

    def reclaim(including_own: bool = False) -> list[tuple[JobMessage | None, int]]:
        taken = survivor.reclaim_from_stopped(stream, min_idle_ms=200, count=10, including_own=including_own)
        return [(d.job, d.delivery) for d in taken]

    def consumers() -> dict[bytes, int]:
        return {c["name"]: c["pending"] for c in client.xinfo_consumers(stream, keys.JOB_GROUP)}

    assert reclaim(including_own=True) == []  # delivered a moment ago
    time.sleep(0.25)
    assert reclaim() == [(held, 2)]
    assert reclaim(including_own=True) == [(left, 2)]
    assert consumers() == {b"survivor": 2, b"alive": 1, b"stopped": 0}


def test_reclaim_skips_entries_deleted_while_pending(client: redis.Redis) -> None:
    stream = fresh_stream()
    jobs = JobStreams(client, "survivor")
    jobs.ensure_groups([stream])
    gone = client.xadd(stream, job().to_fields())
    kept = job()
    client.xadd(stream, kept.to_fields())
    JobStreams(client, "dead").read([stream], count=2)
    client.xdel(stream, gone)
    assert [d.job for d in jobs.reclaim(stream, min_idle_ms=0, count=10)] == [kept]


def test_publish_settles_every_delivery_in_one_go(client: redis.Redis) -> None:
    stream = fresh_stream()
    jobs = JobStreams(client, "w1")
    jobs.ensure_groups([stream])
    answered, poison = job(), job()
    client.xadd(stream, answered.to_fields())
    client.xadd(stream, poison.to_fields())
    client.xadd(stream, {"meta": b"{not json"})
    deliveries = jobs.read([stream], count=10)[stream]
    by_job = {d.job.job_id if d.job else None: d for d in deliveries}
    answer = ResultMessage.answering(answered, PredictionStatus.done, delivery=1)
    given_up = ResultMessage.answering(poison, PredictionStatus.failed, error="gave up", dead_lettered=True)
    jobs.publish(
        stream,
        deliveries,
        [answer, given_up],
        [DeadLetter(by_job[poison.job_id], "gave up"), DeadLetter(by_job[None], by_job[None].error or "")],
    )

    assert [ResultMessage.from_fields(f) for _id, f in entries(client.xrange(keys.RESULT_STREAM))] == [answer, given_up]
    dead = [fields for _id, fields in entries(client.xrange(keys.DEAD_LETTER_STREAM))]
    assert dead[0][b"entry_id"] == by_job[poison.job_id].entry_id and dead[0][b"reason"] == b"gave up"
    assert JobMessage.model_validate_json(dead[0][b"meta"]).job_id == poison.job_id
    assert dead[1][b"reason"].startswith(b"malformed job message") and b"meta" not in dead[1]
    assert dead[1][b"stream"] == stream.encode()
    assert client.xpending(stream, keys.JOB_GROUP)["pending"] == 0
    assert client.xlen(stream) == 0  # settled entries are deleted: the queue depth counts only the unsettled


def test_mark_running_marks_each_prediction_for_a_while(client: redis.Redis) -> None:
    a, b = job(), job()
    JobStreams(client, "w1").mark_running([a, b])
    for message in (a, b):
        assert 0 < client.ttl(keys.job_running_key(message.prediction_id)) <= 600
