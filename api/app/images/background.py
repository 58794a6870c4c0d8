"""The periodic retry of the blob deletions a deletion could not finish."""

from __future__ import annotations

import asyncio

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core.errors import OutageLog
from api.app.core.tasks import run_every
from api.app.images import service
from api.app.images.storage import LocalBlobStore


async def retry_deletions_periodically(
    sessionmaker: async_sessionmaker[AsyncSession],
    *,
    store: LocalBlobStore,
    stop: asyncio.Event,
    outage_log: OutageLog,
) -> None:
    """``service.retry_blob_deletions`` every ``service.BLOB_DELETION_RETRY_SECONDS`` until
    ``stop`` is set."""

    async def once() -> None:
        async with sessionmaker() as session:
            await service.retry_blob_deletions(session=session, store=store)

    await run_every(service.BLOB_DELETION_RETRY_SECONDS, once, name="blob deletions", stop=stop, outage_log=outage_log)
