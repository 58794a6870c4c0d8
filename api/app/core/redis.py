"""Redis clients: one for short commands, one for requests' blocking waits, one for the background loops' blocking reads."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

from api.app.core.config import Settings


def make_redis(settings: Settings, *, blocking: bool = False, max_connections: int | None = None) -> Redis:
    """A client whose commands fail fast when Redis is down; at most ``max_connections``
    connections (default ``REDIS_MAX_CONNECTIONS``).

    Blocking waits (BLPOP, XREADGROUP BLOCK) need no socket timeout of their own, because the
    command's own timeout bounds them; everything else gives up after one second. A command that
    meets a connection Redis closed (after a restart) is retried once on a fresh connection.

    When every connection is taken, a short command waits up to two seconds for one and then
    fails as an outage would; a blocking wait queues until one is handed back, because its
    holders hand them back within their own waits' timeouts (a one-call prediction's waits last
    at most ``GONE_CHECK_SECONDS``): more waiting requests than connections then wait a little
    longer, instead of being told that Redis is down.
    """
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections or settings.redis_max_connections,
        timeout=None if blocking else 2,
        socket_connect_timeout=1,
        socket_timeout=None if blocking else 1,
        health_check_interval=15,
        retry=Retry(NoBackoff(), retries=1, supported_errors=(ConnectionError, TimeoutError)),
    )
    return Redis(connection_pool=pool)
