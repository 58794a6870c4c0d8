"""The registry in flight: the API publishes each revision of the registry (kept in PostgreSQL) to
Redis, where workers read it. A message on ``REGISTRY_CHANNEL`` says a revision is out; workers
also check ``revision`` now and then, so a message they missed never leaves them stale."""

from __future__ import annotations

from typing import cast

import redis
import redis.asyncio
from pydantic import BaseModel

from contracts import keys
from contracts.registry import Registry


class RegistrySnapshot(BaseModel):
    revision: int
    """The id of the registry's latest change; higher is newer."""
    source: str
    """Which database it came from: a revision is compared only with one from the same database."""
    registry: Registry


SNAPSHOT_TTL_S = 3600
"""The snapshot expires unless republished (every API process refreshes it each second): no key of
the portal outlives the processes that keep it. A worker that finds none keeps what it serves."""

# Replaces the snapshot only with a newer revision of the same database, or one of another database
# (the API was pointed at a new one), so that a process a moment behind never republishes the past.
_PUBLISH = """
local current = redis.call('HMGET', KEYS[1], 'revision', 'source')
if current[1] and current[2] == ARGV[2] and tonumber(current[1]) >= tonumber(ARGV[1]) then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return 0
end
redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'source', ARGV[2], 'registry', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return 1
"""


async def publish(client: redis.asyncio.Redis, snapshot: RegistrySnapshot) -> bool:
    """Publishes ``snapshot`` unless Redis holds the same or a newer revision of its source; True
    when it did (and announced it on ``REGISTRY_CHANNEL``)."""
    done = await client.eval(
        _PUBLISH,
        2,
        keys.REGISTRY_KEY,
        keys.REGISTRY_CHANNEL,
        str(snapshot.revision),
        snapshot.source,
        snapshot.registry.model_dump_json(),
        str(SNAPSHOT_TTL_S),
    )
    return bool(done)


def published_revision(client: redis.Redis) -> tuple[str, int] | None:
    """(source, revision) of the snapshot in Redis; None when none was published."""
    source, revision = cast(list[bytes | None], client.hmget(keys.REGISTRY_KEY, ["source", "revision"]))
    if source is None or revision is None:
        return None
    return source.decode(), int(revision)


def read_snapshot(client: redis.Redis) -> RegistrySnapshot | None:
    """The snapshot in Redis; None when none was published."""
    fields = cast(dict[bytes, bytes], client.hgetall(keys.REGISTRY_KEY))
    if not fields:
        return None
    return RegistrySnapshot(
        revision=int(fields[b"revision"]),
        source=fields[b"source"].decode(),
        registry=Registry.model_validate_json(fields[b"registry"]),
    )
