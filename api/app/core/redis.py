"""Redis clients: one for short commands, one for blocking waits."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

from api.app.core.config import Settings


def make_redis(settings: Settings, *, blocking: bool = False) -> Redis:
    """A client whose commands fail fast when Redis is down.

    Blocking waits (BLPOP, XREADGROUP BLOCK) need no socket timeout of their own, because the
    command's own timeout bounds them; everything else gives up after one second. A command that
    meets a connection Redis closed (after a restart) is retried once on a fresh connection.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=2,
        socket_connect_timeout=1,
        socket_timeout=None if blocking else 1,
        health_check_interval=15,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(ConnectionError, TimeoutError)),
    )
    return Redis(connection_pool=pool)
