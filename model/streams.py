"""The model worker's side of the job streams: its consumer group, reading new jobs, taking over
those a dead worker held (with their delivery counts), and publishing answers together with the
acknowledgements and dead letters they settle.

Delivery is at least once: an entry is acknowledged only in the transaction that publishes its
answer or its dead letter, so a worker that dies before that leaves it pending for ``reclaim``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.typing import EncodableT, FieldT

from contracts import keys, streams
from contracts.messages import JobMessage, ResultMessage

Entries = Sequence[tuple[bytes, dict[bytes, bytes]]]
"""Stream entries as a client without ``decode_responses`` answers them (RESP2): (entry id, fields)."""

RUNNING_TTL_S = 600


@dataclass
class Delivery:
    """One job stream entry handed to this worker."""

    stream: str
    entry_id: bytes
    job: JobMessage | None
    """None when the entry could not be decoded; ``error`` says why."""
    error: str | None = None
    delivery: int = 1
    """How many times the entry has been delivered, this time included (more than one: reclaimed)."""


@dataclass
class DeadLetter:
    """An entry given up, with the reason an operator reads in the dead-letter stream."""

    delivery: Delivery
    reason: str


def decode(stream: str, entries: Entries) -> list[Delivery]:
    """The deliveries of these entries of ``stream``; a malformed one becomes a delivery without a
    job, to be dead-lettered rather than retried forever."""
    out = []
    for entry_id, fields in entries:
        try:
            out.append(Delivery(stream, entry_id, JobMessage.from_fields(fields)))
        except Exception as exc:
            out.append(Delivery(stream, entry_id, None, error=f"malformed job message: {exc}"))
    return out


class JobStreams:
    """One consumer (this worker) of the job streams' group, over a synchronous client.

    Every method raises what redis-py raises: ``contracts.streams.REDIS_ERRORS`` while Redis is
    away, ``redis.exceptions.ResponseError`` with NOGROUP once it lost its data.
    """

    def __init__(self, client: redis.Redis, consumer: str) -> None:
        self.client = client
        self.consumer = consumer

    def ensure_groups(self, job_streams: Iterable[str]) -> None:
        """Creates the workers' group on each stream unless it exists."""
        for stream in job_streams:
            streams.ensure_group(self.client, stream, keys.JOB_GROUP)

    def read(self, job_streams: Iterable[str], *, count: int, block_ms: int | None = None) -> dict[str, list[Delivery]]:
        """New jobs (never delivered to any worker), at most ``count`` per stream, by stream name;
        waits up to ``block_ms`` for the first one (None: answers at once)."""
        response = cast(
            list[tuple[bytes, Entries]] | None,
            self.client.xreadgroup(
                keys.JOB_GROUP, self.consumer, {stream: ">" for stream in job_streams}, count=count, block=block_ms
            ),
        )
        out: dict[str, list[Delivery]] = {}
        for stream, entries in response or []:
            out.setdefault(stream.decode(), []).extend(decode(stream.decode(), entries))
        return out

    def waiting(self, stream: str) -> int:
        """Jobs in ``stream`` not yet delivered to any worker: answered ones are deleted, so the
        stream holds the waiting and the pending ones."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xpending(stream, keys.JOB_GROUP)
            length, pending = pipe.execute()
        return max(0, int(length) - int(pending["pending"]))

    def reclaim(self, stream: str, *, min_idle_ms: int, count: int) -> list[Delivery]:
        """Takes over up to ``count`` jobs of ``stream`` delivered at least ``min_idle_ms`` ago and
        still unacknowledged (their worker died or hangs), each with its delivery count."""
        claimed: list[tuple[bytes, dict[bytes, bytes] | None]]
        _next, claimed, *_ = self.client.xautoclaim(
            stream, keys.JOB_GROUP, self.consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        # Entries deleted while pending come back without fields (Redis 6.2).
        deliveries = decode(stream, [(entry_id, fields) for entry_id, fields in claimed if fields])
        for delivery in deliveries:
            delivery.delivery = streams.times_delivered(self.client, stream, keys.JOB_GROUP, delivery.entry_id)
        return deliveries

    def reclaim_from_stopped(
        self, stream: str, *, min_idle_ms: int, count: int, including_own: bool = False
    ) -> list[Delivery]:
        """Takes over up to ``count`` jobs of ``stream`` held by workers whose heartbeat is gone
        (stopped or killed; a consumer is named after its worker) and delivered at least
        ``min_idle_ms`` ago, each with its delivery count. Without it they wait for
        ``VISIBILITY_TIMEOUT_MS``, as long as a one-call prediction waits for its answer.
        ``including_own``: also the jobs held under this worker's own name, by an earlier process
        of the same name (a container restarted keeps its host name and often its pid).

        Stopped workers stay in the group here: deleting a consumer drops what it holds, and a
        worker whose heartbeat merely lapsed may be reading at that moment. ``forget_stopped``
        removes them once they hold nothing."""
        try:
            consumers = self.client.xinfo_consumers(stream, keys.JOB_GROUP)
        except redis.exceptions.ResponseError as exc:
            if "no such key" in str(exc):
                return []  # Redis lost its data: the next read finds the group gone and makes it again
            raise
        names = [_text(c["name"]) for c in consumers if c["pending"]]
        others = [name for name in names if name != self.consumer]
        with self.client.pipeline(transaction=False) as pipe:
            for name in others:
                pipe.exists(keys.heartbeat_key(name))
            alive = pipe.execute() if others else []
        stopped = [name for name, beating in zip(others, alive, strict=True) if not beating]
        if including_own and self.consumer in names:
            stopped.append(self.consumer)
        entry_ids: list[Any] = []
        for name in stopped:
            if len(entry_ids) >= count:
                break
            held = self.client.xpending_range(
                stream,
                keys.JOB_GROUP,
                min="-",
                max="+",
                count=count - len(entry_ids),
                consumername=name,
                idle=min_idle_ms,
            )
            entry_ids.extend(entry["message_id"] for entry in held)
        if not entry_ids:
            return []
        claimed = cast(
            list[tuple[bytes, dict[bytes, bytes] | None]],
            self.client.xclaim(stream, keys.JOB_GROUP, self.consumer, min_idle_time=min_idle_ms, message_ids=entry_ids),
        )
        deliveries = decode(stream, [(entry_id, fields) for entry_id, fields in claimed if fields])
        for delivery in deliveries:
            delivery.delivery = streams.times_delivered(self.client, stream, keys.JOB_GROUP, delivery.entry_id)
        return deliveries

    def forget_stopped(self, stream: str) -> int:
        """Has the job group of ``stream`` forget consumers that hold no job and have not read for
        IDLE_CONSUMER_FORGET_MS (workers that stopped; each process reads under its own name),
        so the group does not grow with every worker that ever ran. Returns how many."""
        return streams.forget_idle_consumers(self.client, stream, keys.JOB_GROUP, streams.IDLE_CONSUMER_FORGET_MS)

    def mark_running(self, jobs: Iterable[JobMessage]) -> None:
        """Marks these jobs' predictions as being computed (the API reports them as running)."""
        with self.client.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.set(keys.job_running_key(job.prediction_id), 1, ex=RUNNING_TTL_S)
            pipe.execute()

    def publish(
        self,
        stream: str,
        deliveries: Iterable[Delivery],
        answers: Iterable[ResultMessage],
        dead_letters: Iterable[DeadLetter] = (),
    ) -> None:
        """Adds the answers to the result stream and the dead letters to theirs, then acknowledges
        and deletes the ``deliveries`` of ``stream``, all in one transaction: an entry is never
        acknowledged without what settles it."""
        with self.client.pipeline(transaction=True) as pipe:
            for answer in answers:
                pipe.xadd(keys.RESULT_STREAM, answer.to_fields(), maxlen=streams.STREAM_MAXLEN, approximate=True)
            for dead in dead_letters:
                fields: dict[FieldT, EncodableT] = {
                    "stream": dead.delivery.stream,
                    "entry_id": dead.delivery.entry_id,
                    "reason": dead.reason,
                }
                if dead.delivery.job is not None:
                    fields["meta"] = dead.delivery.job.model_dump_json()
                pipe.xadd(keys.DEAD_LETTER_STREAM, fields, maxlen=streams.DEAD_LETTER_MAXLEN, approximate=True)
            for delivery in deliveries:
                pipe.xack(stream, keys.JOB_GROUP, delivery.entry_id)
                pipe.xdel(stream, delivery.entry_id)
            pipe.execute()


def _text(name: bytes | str) -> str:
    return name.decode() if isinstance(name, bytes) else name
