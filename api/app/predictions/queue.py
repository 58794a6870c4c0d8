"""The API's side of the Redis job queue: enqueue, depth, notifications and the result cache."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import cast

import redis.exceptions
from redis.asyncio import Redis

from api.app.core.redis import pool_exhausted
from contracts import keys
from contracts.messages import JobMessage, LabelScore, ResultMessage
from contracts.streams import STREAM_MAXLEN


async def enqueue(redis: Redis, messages: list[JobMessage]) -> None:
    if len(messages) == 1:  # the usual case; a pipeline of one costs more client CPU than the command
        msg = messages[0]
        await redis.xadd(
            keys.job_stream(msg.model, msg.version), msg.to_fields(), maxlen=STREAM_MAXLEN, approximate=True
        )
        return
    async with redis.pipeline(transaction=False) as pipe:
        for msg in messages:
            pipe.xadd(
                keys.job_stream(msg.model, msg.version),
                msg.to_fields(),
                maxlen=STREAM_MAXLEN,
                approximate=True,
            )
        await pipe.execute()


async def server_time_ms(redis: Redis) -> int:
    """The Redis server's clock in milliseconds: the clock of the stream entry ids it assigns."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def drop_entries_before(redis: Redis, model: str, version: int, before_ms: int) -> int:
    """Deletes the entries of the version's job stream added before ``before_ms`` (Redis server
    milliseconds, ``server_time_ms``): ``XTRIM MINID``, exact. For a version retired while no
    worker serves it, whose every unfinished prediction is expired: its entries, images included,
    would otherwise stay in Redis (which evicts nothing) and in its depth for good. How many."""
    return int(await redis.xtrim(keys.job_stream(model, version), minid=f"{before_ms}-0", approximate=False))


async def depth(redis: Redis, model: str, version: int) -> int:
    """Jobs of one model version not yet answered: workers delete each entry once answered, so
    the stream holds exactly the undelivered and the delivered-but-unacknowledged ones."""
    return int(await redis.xlen(keys.job_stream(model, version)))


DEPTH_READING_SECONDS = 0.1
"""How long a reading of a queue's depth that found it at most half full is trusted (``has_room``)."""


@dataclass
class _Stream:
    """What this process knows of one job stream's depth."""

    admitted: int = 0
    """Admissions this process made to the stream (ever)."""
    depth: int = 0
    """XLEN of the newest reading."""
    base: int = 0
    """``admitted`` when that XLEN was sent: the admissions since are not in it."""
    at: float = float("-inf")
    """When that XLEN was sent (monotonic seconds)."""


_streams: weakref.WeakKeyDictionary[Redis, dict[str, _Stream]] = weakref.WeakKeyDictionary()
"""Per client (each app has its own), what this process knows of each job stream."""


async def has_room(redis: Redis, model: str, version: int, cap: int) -> bool:
    """Whether the queue of ``model``@``version`` holds fewer than ``cap`` jobs, counting the one
    about to be admitted once this returns True.

    Under load every prediction asked Redis (XLEN, a round trip and about 5 % of the API's CPU per
    prediction in ``python -m bench.profile``). A reading sent less than ``DEPTH_READING_SECONDS``
    ago whose depth, plus what this process admitted since it was sent, stays under half of
    ``cap`` with this one is trusted without asking again; anything closer to the cap is read
    afresh, so a full queue is only ever reported from a fresh reading, and a reading never
    replaces a newer one that came back first. The cap stays a soft one, as it was: other API
    processes admit meanwhile too, at most half a cap each before they read again.
    """
    stream = keys.job_stream(model, version)
    known = _streams.setdefault(redis, {}).setdefault(stream, _Stream())
    now = time.monotonic()
    if now - known.at > DEPTH_READING_SECONDS or 2 * (known.depth + known.admitted - known.base + 1) > cap:
        base = known.admitted
        depth = int(await redis.xlen(stream))
        if now >= known.at:
            known.depth, known.base, known.at = depth, base, now
        if depth >= cap:
            return False
    known.admitted += 1
    return True


async def depths(redis: Redis, versions: list[tuple[str, int]]) -> list[int]:
    """``depth`` of each (model, version), in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for model, version in versions:
            pipe.xlen(keys.job_stream(model, version))
        return [int(n) for n in await pipe.execute()]


async def notify_done(
    redis: Redis, answers: dict[str, bytes], ttl: int, *, ack: tuple[str, str, list[bytes]] | None = None
) -> None:
    """Wakes the requests waiting for these jobs (job id -> its answers, which the request is
    handed); ``ack`` (stream, group, entry ids) acknowledges the results that finished them in
    the same round trip."""
    async with redis.pipeline(transaction=True) as pipe:
        for job_id, payload in answers.items():
            key = keys.job_done_key(job_id)
            pipe.rpush(key, payload)
            pipe.expire(key, ttl)
        if ack is not None:
            stream, group, entry_ids = ack
            pipe.xack(stream, group, *entry_ids)
        await pipe.execute()


async def wait_done(redis_blocking: Redis, job_id: str, seconds: float) -> bytes | None:
    """Blocks (without polling) until the job is finished, then returns what its notification
    carries; None once ``seconds`` pass, or when no blocking connection came free within
    ``POOL_WAIT_SECONDS``."""
    if seconds <= 0:
        return None
    try:
        got = cast(list[bytes] | None, await redis_blocking.blpop([keys.job_done_key(job_id)], timeout=seconds))
    except redis.exceptions.ConnectionError as exc:
        if not pool_exhausted(exc):
            raise
        # Other waiting requests hold every blocking connection: no answer seen yet. The caller
        # asks again after checking its job and its deadline, so it ends in time, never as if
        # Redis were down (the answer stays in its list until then).
        return None
    return got[1] if got is not None else None


async def cached_result(redis: Redis, owner_id: int, sha256: str, model: str, version: int) -> ResultMessage | None:
    raw = await redis.get(keys.result_cache_key(owner_id, sha256, model, version))
    return ResultMessage.model_validate_json(raw) if raw is not None else None


async def cache_result(redis: Redis, owner_id: int, result: ResultMessage, ttl: int) -> None:
    """Caches ``result`` for ``ttl`` seconds for its owner's next request of the same image, in
    one round trip; deletes it again when the owner was deleted meanwhile (``keys.deleted_owner_key``)."""
    key = keys.result_cache_key(owner_id, result.sha256, result.model, result.version)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(key, result.model_dump_json(), ex=ttl)
        pipe.exists(keys.deleted_owner_key(owner_id))
        _, deleted = await pipe.execute()
    if deleted:
        await redis.delete(key)


def top1(top_k: list[LabelScore]) -> tuple[str | None, float | None]:
    return (top_k[0].label, top_k[0].score) if top_k else (None, None)
