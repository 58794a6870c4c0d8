"""How model workers announce themselves in Redis and how the others find them.

A worker's heartbeat is a key that expires (``worker:<id>``); whether it exists is what "live"
means. Beside it, a sorted set names every worker that has announced itself, scored by the time
of its last heartbeat, so that finding the workers reads that set instead of scanning a keyspace
that holds every recent job's keys. Members whose heartbeat has not been renewed for
``FORGET_AFTER_S`` are dropped; the long margin keeps clocks that disagree by minutes harmless.

Writing queues commands on a pipeline, which the synchronous worker and the asynchronous API
share; reading has a synchronous and an asynchronous twin.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import redis.asyncio

from contracts import keys
from contracts.messages import Heartbeat

LIVE_WORKERS = "workers:live"
FORGET_AFTER_S = 300.0


def announce(pipe: Any, *, worker_id: str, heartbeat_json: str, ttl_ms: int, now: float) -> None:
    """Queues a worker's heartbeat and its place in the index."""
    pipe.set(keys.heartbeat_key(worker_id), heartbeat_json, px=ttl_ms)
    pipe.zadd(LIVE_WORKERS, {worker_id: now})
    pipe.expire(LIVE_WORKERS, int(FORGET_AFTER_S))  # gone once no worker has announced itself for that long


def withdraw(pipe: Any, *, worker_id: str) -> None:
    """Queues a stopping worker's removal."""
    pipe.delete(keys.heartbeat_key(worker_id))
    pipe.zrem(LIVE_WORKERS, worker_id)


def _list_announced(pipe: Any) -> None:
    """Queues dropping forgotten members, then reading the rest; the second reply holds the ids."""
    pipe.zremrangebyscore(LIVE_WORKERS, "-inf", time.time() - FORGET_AFTER_S)
    pipe.zrange(LIVE_WORKERS, 0, -1)


def _heartbeats(raws: list[bytes | str | None]) -> list[Heartbeat]:
    return [Heartbeat.model_validate_json(raw) for raw in raws if raw is not None]


def _heartbeat_keys(worker_ids: list[bytes] | list[str]) -> list[str]:
    # Clients made with decode_responses (the API's) answer str, the others bytes.
    return [keys.heartbeat_key(w.decode() if isinstance(w, bytes) else w) for w in worker_ids]


def live_heartbeats(client: redis.Redis) -> list[Heartbeat]:
    """The heartbeats of the workers alive now."""
    with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe)
        _dropped, announced = pipe.execute()
    return _heartbeats(client.mget(_heartbeat_keys(announced))) if announced else []


async def live_heartbeats_async(client: redis.asyncio.Redis) -> list[Heartbeat]:
    """``live_heartbeats`` for an asyncio client."""
    async with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe)
        _dropped, announced = await pipe.execute()
    return _heartbeats(await client.mget(_heartbeat_keys(announced))) if announced else []
