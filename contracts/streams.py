"""What the worker and the API both do with Redis Streams: which errors mean Redis is away, how
long streams may grow, creating a consumer group, and counting an entry's deliveries.

Helpers that talk to Redis have a synchronous twin (the model worker) and an asynchronous one (the
API) side by side, as ``contracts.workers`` does.
"""

from __future__ import annotations

from typing import Any

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
    """Whether Redis refused a command because the stream or its group is gone (NOGROUP): it
    lost its data, and the caller creates the group again."""
    return "NOGROUP" in str(exc)


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
