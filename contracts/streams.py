"""What the worker and the API both do with Redis Streams: which errors mean Redis is away, how
long streams may grow, creating a consumer group, and counting an entry's deliveries.

Helpers that talk to Redis have a synchronous twin (the model worker) and an asynchronous one (the
API) side by side, as ``contracts.workers`` does.
"""

from __future__ import annotations

from typing import Any, cast

import redis
import redis.asyncio
import redis.exceptions
from redis.typing import EncodableT, FieldT

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""The errors that mean Redis cannot be reached now (retry later), not that a command was wrong."""

STREAM_MAXLEN = 100_000
"""Approximate cap on the job streams and the result stream (``XADD MAXLEN ~``)."""
DEAD_LETTER_MAXLEN = 10_000
"""Approximate cap on the dead-letter streams of jobs and of results."""

StreamFields = dict[FieldT, EncodableT]
"""An entry's fields as XADD takes them."""


def group_missing(exc: redis.exceptions.ResponseError) -> bool:
    """Whether Redis refused a command because the stream or its group is gone: NOGROUP, or
    UNBLOCKED for a read that was waiting when the stream was deleted (Redis 7; FLUSHDB or a
    restart without its data). It lost its data, and the caller creates the group again."""
    message = str(exc)
    return "NOGROUP" in message or message.startswith("UNBLOCKED")


def _already_exists(exc: redis.exceptions.ResponseError) -> bool:
    return "BUSYGROUP" in str(exc)


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Creates the consumer group (and the stream) unless it exists.

    The group starts at the stream's first entry, so entries added before any consumer existed are
    delivered too. Raises ``redis.exceptions.ResponseError`` for any refusal but "already exists".
    """
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if not _already_exists(exc):
            raise


async def ensure_group_async(client: redis.asyncio.Redis, stream: str, group: str) -> None:
    """``ensure_group`` for an asyncio client."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.exceptions.ResponseError as exc:
        if not _already_exists(exc):
            raise


def _times_delivered(pending: list[dict[str, Any]]) -> int:
    # An entry no longer pending (acknowledged meanwhile) counts as delivered once.
    return int(pending[0]["times_delivered"]) if pending else 1


def times_delivered(client: redis.Redis, stream: str, group: str, entry_id: bytes | str) -> int:
    """How many times the group has delivered this entry (XPENDING), the current delivery included."""
    return _times_delivered(client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1))


async def times_delivered_async(client: redis.asyncio.Redis, stream: str, group: str, entry_id: bytes | str) -> int:
    """``times_delivered`` for an asyncio client."""
    return _times_delivered(await client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1))


FORGET_EVERY_S = 60.0
"""How often each reader has its group forget idle consumers (``forget_idle_consumers``)."""
IDLE_CONSUMER_FORGET_MS = 3_600_000
"""How long a consumer with nothing pending must not have read before its group forgets it. Every
process reads under a name of its own, so without this a group keeps one consumer per process
that ever ran (each restart, each replaced pod), and XINFO CONSUMERS grows with that history."""

# Atomic: no XREADGROUP can run between the check of a consumer's pending count and its deletion,
# so XGROUP DELCONSUMER never drops an entry a consumer holds (a live consumer forgotten while idle
# is made again by its next read). Field names as XINFO CONSUMERS gives them (Redis 6.2-7.x).
_FORGET_IDLE_CONSUMERS = """
local forgotten = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local field = {}
  for i = 1, #consumer, 2 do field[consumer[i]] = consumer[i + 1] end
  if field['pending'] == 0 and field['idle'] >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field['name'])
    forgotten = forgotten + 1
  end
end
return forgotten
"""


def _nothing_to_forget(exc: redis.exceptions.ResponseError) -> bool:
    # The stream or its group is gone (Redis lost its data): the next read makes them again.
    return "no such key" in str(exc) or "NOGROUP" in str(exc)


def forget_idle_consumers(client: redis.Redis, stream: str, group: str, idle_ms: int) -> int:
    """Deletes the consumers of ``group`` on ``stream`` that hold no entry and have not read for
    ``idle_ms`` (stopped processes); returns how many. 0 when the stream or group is gone."""
    try:
        return int(cast(int, client.eval(_FORGET_IDLE_CONSUMERS, 1, stream, group, idle_ms)))
    except redis.exceptions.ResponseError as exc:
        if _nothing_to_forget(exc):
            return 0
        raise


async def forget_idle_consumers_async(client: redis.asyncio.Redis, stream: str, group: str, idle_ms: int) -> int:
    """``forget_idle_consumers`` for an asyncio client."""
    try:
        return int(cast(int, await client.eval(_FORGET_IDLE_CONSUMERS, 1, stream, group, idle_ms)))
    except redis.exceptions.ResponseError as exc:
        if _nothing_to_forget(exc):
            return 0
        raise
