"""Redis clients: one for short commands, one for blocking waits."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

from api.app.core.config import Settings


def make_redis(settings: Settings, *, blocking: bool = False) -> Redis:
    """A client whose commands fail fast when Redis is down.

    Blocking waits (BLPOP, XREADGROUP BLOCK) need no socket timeout of their own, because the
    command's own timeout bounds them; everything else gives up after one second.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=2,
        socket_connect_timeout=1,
        socket_timeout=None if blocking else 1,
        health_check_interval=15,
    )
    return Redis(connection_pool=pool)
