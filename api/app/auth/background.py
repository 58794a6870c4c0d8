"""Auth housekeeping every API process runs: forget the revocations of tokens that have expired."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.auth import service
from api.app.core.errors import OutageLog
from api.app.core.tasks import run_every

log = logging.getLogger("api.auth")


async def forget_revocations(
    sessionmaker: async_sessionmaker[AsyncSession], *, interval: float, stop: asyncio.Event, outage_log: OutageLog
) -> None:
    """Deletes the revocations of expired tokens at start-up and then every ``interval`` seconds."""

    async def step() -> None:
        async with sessionmaker() as session:
            deleted = await service.forget_expired_revocations(session=session)
        if deleted:
            log.info("forgot %d revocations of expired tokens", deleted)

    await run_every(interval, step, name="revocation cleanup", stop=stop, outage_log=outage_log)
