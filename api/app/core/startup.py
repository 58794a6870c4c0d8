"""Waiting for PostgreSQL and Redis at start-up: bounded, one line per attempt, readable failure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy.engine import make_url

from api.app.core.config import Settings
from api.app.core.db import tls_mode_as
from contracts.redis_policy import EvictionCheck, check_eviction_policy_async
from contracts.streams import REDIS_ERRORS

log = logging.getLogger("api.startup")


class DependencyUnavailable(RuntimeError):
    pass


def redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True) if "://" in url else url


async def _retry(name: str, url: str, attempt: Callable[[], Awaitable[None]], settings: Settings) -> None:
    last: BaseException | None = None
    for n in range(1, settings.dependency_wait_attempts + 1):
        try:
            await attempt()
            if n > 1:
                log.info("%s at %s is up (attempt %d)", name, redact(url), n)
            return
        except Exception as exc:  # every failure is retried the same way; the last one is reported
            last = exc
            log.warning(
                "waiting for %s at %s (attempt %d/%d): %s: %s",
                name,
                redact(url),
                n,
                settings.dependency_wait_attempts,
                type(exc).__name__,
                exc,
            )
            await asyncio.sleep(settings.dependency_wait_interval)
    raise DependencyUnavailable(
        f"{name} at {redact(url)} did not answer after {settings.dependency_wait_attempts} attempts: "
        f"{type(last).__name__}: {last}"
    )


def asyncpg_dsn(database_url: str, database: str | None = None) -> str:
    """``database_url`` (a SQLAlchemy URL) as a DSN for ``asyncpg.connect``, of ``database`` when
    given: the TLS mode, spelled ``ssl=`` or ``sslmode=``, as ``sslmode=``."""
    url = tls_mode_as(database_url, "sslmode").set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def wait_for_postgres(settings: Settings, database: str | None = None) -> None:
    dsn = asyncpg_dsn(settings.database_url, database)

    async def attempt() -> None:
        conn = await asyncpg.connect(dsn, timeout=2)
        await conn.close()

    await _retry("PostgreSQL", dsn, attempt, settings)


async def wait_for_redis(settings: Settings) -> None:
    async def attempt() -> None:
        client = aioredis.from_url(settings.redis_url, socket_connect_timeout=1, socket_timeout=1)
        try:
            await client.ping()
        finally:
            await client.aclose()

    await _retry("Redis", settings.redis_url, attempt, settings)


async def check_redis_eviction(settings: Settings, client: aioredis.Redis | None = None) -> EvictionCheck | None:
    """Reads Redis's eviction policy (through ``client``, else a short-lived client of its own) and
    logs the warning when an evicting policy is allowed (ALLOW_REDIS_EVICTION). None when Redis
    cannot be reached now: ``/health/ready`` reads the policy again on every call. Raises
    ``contracts.redis_policy.EvictionPolicyRefused`` (its message one line) for an evicting policy
    that is not allowed; the caller says so and stops."""
    own = client is None
    # No retries of its own: Redis down at start-up is not a verdict, and must not delay the start.
    redis_client = client or aioredis.from_url(
        settings.redis_url, socket_connect_timeout=1, socket_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    try:
        check = await check_eviction_policy_async(redis_client, allow=settings.allow_redis_eviction)
    except REDIS_ERRORS:
        return None
    finally:
        if own:
            await redis_client.aclose()
    if check.warning:
        log.warning("%s", check.warning)
    return check
