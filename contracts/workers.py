"""How model workers and explainers announce themselves in Redis and how the others find them.

A worker's heartbeat is a key that expires (``worker:<id>``, an explainer's ``explainer:<id>``);
whether it exists is what "live" means. Beside it, a sorted set names every worker
(``LIVE_WORKERS``) or explainer (``LIVE_EXPLAINERS``) that has announced itself, scored by the
time of its last heartbeat, so that finding them reads that set instead of scanning a keyspace
that holds every recent job's keys. Members whose heartbeat has not been renewed for
``FORGET_AFTER_S`` are dropped; the long margin keeps clocks that disagree by minutes harmless.

Writing queues commands on a pipeline, which the synchronous worker and the asynchronous API
share; reading has a synchronous and an asynchronous twin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio

from contracts import keys
from contracts.messages import ExplainerHeartbeat, Heartbeat

LIVE_WORKERS = "workers:live"
LIVE_EXPLAINERS = "explainers:live"
"""The explainers' index. Its name matches no ``explainer:*`` heartbeat: an API of an earlier
version found explainers by scanning for those, and still finds the heartbeats alone."""
FORGET_AFTER_S = 300.0


def _announce(pipe: Any, *, index: str, member: str, key: str, heartbeat_json: str, ttl_ms: int, now: float) -> None:
    pipe.set(key, heartbeat_json, px=ttl_ms)
    pipe.zadd(index, {member: now})
    pipe.expire(index, int(FORGET_AFTER_S))  # gone once nobody has announced itself for that long


def announce(pipe: Any, *, worker_id: str, heartbeat_json: str, ttl_ms: int, now: float) -> None:
    """Queues a worker's heartbeat and its place in the index."""
    _announce(
        pipe,
        index=LIVE_WORKERS,
        member=worker_id,
        key=keys.heartbeat_key(worker_id),
        heartbeat_json=heartbeat_json,
        ttl_ms=ttl_ms,
        now=now,
    )


def withdraw(pipe: Any, *, worker_id: str) -> None:
    """Queues a stopping worker's removal."""
    pipe.delete(keys.heartbeat_key(worker_id))
    pipe.zrem(LIVE_WORKERS, worker_id)


def announce_explainer(pipe: Any, *, explainer_id: str, heartbeat_json: str, ttl_ms: int, now: float) -> None:
    """Queues an explainer's heartbeat (``keys.explainer_key``) and its place in the index."""
    _announce(
        pipe,
        index=LIVE_EXPLAINERS,
        member=explainer_id,
        key=keys.explainer_key(explainer_id),
        heartbeat_json=heartbeat_json,
        ttl_ms=ttl_ms,
        now=now,
    )


def withdraw_explainer(pipe: Any, *, explainer_id: str) -> None:
    """Queues a stopping explainer's removal."""
    pipe.delete(keys.explainer_key(explainer_id))
    pipe.zrem(LIVE_EXPLAINERS, explainer_id)


def _list_announced(pipe: Any, index: str) -> None:
    """Queues dropping forgotten members, then reading the rest; the second reply holds the ids."""
    pipe.zremrangebyscore(index, "-inf", time.time() - FORGET_AFTER_S)
    pipe.zrange(index, 0, -1)


def _heartbeats(raws: list[bytes | str | None]) -> list[Heartbeat]:
    return [Heartbeat.model_validate_json(raw) for raw in raws if raw is not None]


def _explainer_heartbeats(raws: list[bytes | str | None]) -> list[ExplainerHeartbeat]:
    beats = []
    for raw in raws:
        if raw is None:  # expired: a dead explainer not yet forgotten by the index
            continue
        try:
            beats.append(ExplainerHeartbeat.model_validate_json(raw))
        except ValueError:
            continue  # not one this version can read: as if absent
    return beats


def _heartbeat_keys(ids: list[bytes] | list[str], key: Callable[[str], str] = keys.heartbeat_key) -> list[str]:
    # Clients made with decode_responses (the API's) answer str, the others bytes.
    return [key(i.decode() if isinstance(i, bytes) else i) for i in ids]


def live_heartbeats(client: redis.Redis) -> list[Heartbeat]:
    """The heartbeats of the workers alive now."""
    with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe, LIVE_WORKERS)
        _dropped, announced = pipe.execute()
    return _heartbeats(client.mget(_heartbeat_keys(announced))) if announced else []


async def live_heartbeats_async(client: redis.asyncio.Redis) -> list[Heartbeat]:
    """``live_heartbeats`` for an asyncio client."""
    async with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe, LIVE_WORKERS)
        _dropped, announced = await pipe.execute()
    return _heartbeats(await client.mget(_heartbeat_keys(announced))) if announced else []


def live_explainer_heartbeats(client: redis.Redis) -> list[ExplainerHeartbeat]:
    """The heartbeats of the explainers alive now (two round trips, however large the keyspace)."""
    with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe, LIVE_EXPLAINERS)
        _dropped, announced = pipe.execute()
    if not announced:
        return []
    return _explainer_heartbeats(client.mget(_heartbeat_keys(announced, keys.explainer_key)))


async def live_explainer_heartbeats_async(client: redis.asyncio.Redis) -> list[ExplainerHeartbeat]:
    """``live_explainer_heartbeats`` for an asyncio client."""
    async with client.pipeline(transaction=False) as pipe:
        _list_announced(pipe, LIVE_EXPLAINERS)
        _dropped, announced = await pipe.execute()
    if not announced:
        return []
    return _explainer_heartbeats(await client.mget(_heartbeat_keys(announced, keys.explainer_key)))
