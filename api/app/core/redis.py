"""Redis clients: one for short commands, one for requests' blocking waits, one for the background
loops' blocking reads."""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

from api.app.core.config import Settings

POOL_WAIT_SECONDS = 2
"""How long a command waits for a pooled connection when all are taken."""


def pool_exhausted(exc: BaseException) -> bool:
    """Whether ``exc`` says that every pooled connection was taken for ``POOL_WAIT_SECONDS``
    (redis-py's ``BlockingConnectionPool``), not that Redis is down."""
    return isinstance(exc, ConnectionError) and isinstance(exc.__cause__, asyncio.TimeoutError)


def make_redis(settings: Settings, *, blocking: bool = False, max_connections: int | None = None) -> Redis:
    """A client whose commands fail fast when Redis is down; at most ``max_connections``
    connections (default ``REDIS_MAX_CONNECTIONS``).

    Blocking waits (BLPOP, XREADGROUP BLOCK) need no socket timeout of their own, because the
    command's own timeout bounds them; everything else gives up after one second. A command that
    meets a connection Redis closed (after a restart) is retried once on a fresh connection.

    When every connection is taken, a command waits up to ``POOL_WAIT_SECONDS`` for one, then
    raises ``ConnectionError`` (``pool_exhausted`` tells it from Redis being down).
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=POOL_WAIT_SECONDS,
        socket_connect_timeout=1,
        socket_timeout=None if blocking else 1,
        health_check_interval=15,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(ConnectionError, TimeoutError)),
    )
    return Redis(connection_pool=pool)
