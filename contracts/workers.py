"""How model workers announce themselves in Redis and how the others find them.

A worker's heartbeat is a key that expires (``worker:<id>``); whether it exists is what "live"
means. Beside it, a sorted set names every worker that has announced itself, scored by the time
of its last heartbeat, so that finding the workers reads that set instead of scanning a keyspace
that holds every recent job's keys. Members whose heartbeat has not been renewed for
``FORGET_AFTER_S`` are dropped; the long margin keeps clocks that disagree by minutes harmless.

The functions queue commands on a pipeline, so the synchronous worker and the asynchronous API
share them.
"""

from __future__ import annotations

from typing import Any

from contracts import keys

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


def list_announced(pipe: Any, *, now: float) -> None:
    """Queues dropping forgotten members, then reading the rest; the second reply holds the ids."""
    pipe.zremrangebyscore(LIVE_WORKERS, "-inf", now - FORGET_AFTER_S)
    pipe.zrange(LIVE_WORKERS, 0, -1)


def heartbeat_keys(worker_ids: list[bytes] | list[str]) -> list[str]:
    return [keys.heartbeat_key(w.decode() if isinstance(w, bytes) else w) for w in worker_ids]
