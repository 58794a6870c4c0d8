"""The periodic roll-up of the statistics' changes, so they stay few between two reads."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core.errors import OutageLog
from api.app.core.tasks import run_every
from api.app.stats import service

VACUUM_EVERY = 30
"""Roll-ups between two vacuums of the change tables."""


async def roll_up_periodically(
    sessionmaker: async_sessionmaker[AsyncSession], *, interval: float, stop: asyncio.Event, outage_log: OutageLog
) -> None:
    """``service.roll_up`` every ``interval`` seconds until ``stop`` is set, and now and then
    ``service.vacuum_changes``."""
    runs = 0

    async def once() -> None:
        nonlocal runs
        async with sessionmaker() as session:
            await service.roll_up(session=session)
            runs += 1
            if runs % VACUUM_EVERY == 0:
                await service.vacuum_changes(session=session)

    await run_every(interval, once, name="statistics roll-up", stop=stop, outage_log=outage_log)
