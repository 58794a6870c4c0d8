"""The periodic computation of the drift indices, by one API process at a time."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core.config import Settings
from api.app.core.errors import OutageLog
from api.app.core.tasks import run_every
from api.app.drift import service
from api.app.registry.live import LiveRegistry
from contracts import keys


async def step(
    *, sessionmaker: async_sessionmaker[AsyncSession], redis: Redis, settings: Settings, live_registry: LiveRegistry
) -> None:
    """Computes the indices when no other process did within the interval (a Redis lock), then
    sets this process's gauges from what is stored, so every live process reports them."""
    lock_ms = max(1, int(settings.drift_interval_seconds * 900))
    async with sessionmaker() as session:
        if await redis.set(keys.DRIFT_LOCK, "1", nx=True, px=lock_ms):
            await service.refresh(
                session=session,
                entries=live_registry.current.served(benchmark_mode=settings.benchmark_mode),
                reference_size=settings.drift_reference_size,
                window_size=settings.drift_window_size,
                bins=settings.drift_bins,
            )
        service.export_gauges(await service.stored(session=session))


async def compute_periodically(
    *,
    sessionmaker: async_sessionmaker[AsyncSession],
    redis: Redis,
    settings: Settings,
    live_registry: LiveRegistry,
    stop: asyncio.Event,
    outage_log: OutageLog,
) -> None:
    """``step`` every DRIFT_INTERVAL_SECONDS until ``stop`` is set."""
    await run_every(
        settings.drift_interval_seconds,
        lambda: step(sessionmaker=sessionmaker, redis=redis, settings=settings, live_registry=live_registry),
        name="drift",
        stop=stop,
        outage_log=outage_log,
    )
