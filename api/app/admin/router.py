from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import IO, Annotated

from anyio import to_thread
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse

from api.app.admin.schemas import Stats
from api.app.core.fields import INT32_MAX, Text
from api.app.core.responses import ADMIN, INVALID, NOT_FOUND, RETRY_AFTER, Responses, error
from api.app.deps import (
    AdminUser,
    DriftRefreshLockDep,
    ReadSessionDep,
    RedisDep,
    RegistryDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    WorkersDep,
)
from api.app.drift import service as drift_service
from api.app.drift.schemas import DriftReport
from api.app.exports.service import DOWNLOADS_DIR, check_known
from api.app.feedback.export import export_archive
from api.app.predictions import queue
from api.app.stats import service as stats_service

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/stats", response_model=Stats, responses={**ADMIN, **INVALID})
async def stats(
    _: AdminUser,
    session: ReadSessionDep,
    redis: RedisDep,
    workers: WorkersDep,
    registry: RegistryDep,
    settings: SettingsDep,
    days: Annotated[int, Query(ge=1, le=365, description="the last this many UTC days, today included")] = 30,
) -> Stats:
    """Predictions per day, latency percentiles, accuracy from feedback, most corrected labels (admin).

    Read from daily summaries (api.app.stats), so the cost follows days × model versions, not the
    history; latency percentiles come from a histogram, within 4.4 % of the exact ones."""
    # Autocommit: the roll-up's statements commit on their own, the reads need no transaction.
    await stats_service.roll_up(session=session)
    served = registry.served(benchmark_mode=settings.benchmark_mode)
    depth = await queue.depths(redis, [(m.name, m.version) for m in served])
    return Stats(
        predictions_per_day=await stats_service.predictions_per_day(session=session, days=days),
        latency=await stats_service.latency(session=session, days=days),
        accuracy=await stats_service.accuracy(session=session),
        most_corrected=await stats_service.most_corrected(session=session, limit=10),
        queue_depth={m.key: n for m, n in zip(served, depth, strict=True)},
        live_workers=len(await workers.heartbeats()),
    )


ZIP: Responses = {
    200: {"content": {"application/zip": {}}, "description": "A zip of <model>/<label>/<image> and feedback.csv"}
}


@router.get("/feedback-export", response_class=StreamingResponse, responses={**ZIP, **ADMIN, **NOT_FOUND, **INVALID})
async def feedback_export(
    _: AdminUser,
    session: ReadSessionDep,
    store: StoreDep,
    registry: RegistryDep,
    settings: SettingsDep,
    model: Annotated[Text | None, Query(description="only this model's predictions, e.g. sketch")] = None,
    version: Annotated[int | None, Query(ge=1, le=INT32_MAX, description="only this version of model")] = None,
) -> StreamingResponse:
    """The images users labelled, by model and label, with a manifest: data to retrain from (admin).
    404 for a model the registry does not know, or a version it does not have."""
    if version is not None and model is None:
        raise HTTPException(status_code=422, detail="version needs model")
    check_known(registry=registry, model=model, version=version)
    archive, summary = await export_archive(
        session=session, store=store, directory=settings.storage_dir / DOWNLOADS_DIR, model=model, version=version
    )
    size = os.fstat(archive.fileno()).st_size
    name = f"feedback-{model or 'all'}{f'-v{version}' if version else ''}.zip"
    return StreamingResponse(
        _chunks(archive),
        media_type="application/zip",
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{name}"',
            "X-Exported-Images": str(summary.examples),
        },
    )


DOWNLOAD_CHUNK = 1024 * 1024
"""Bytes of a downloaded zip read at a time (in a worker thread)."""


async def _chunks(archive: IO[bytes]) -> AsyncIterator[bytes]:
    """The zip's bytes, then closed (which frees it: it has no name), also when the client leaves."""
    try:
        while chunk := await to_thread.run_sync(archive.read, DOWNLOAD_CHUNK):
            yield chunk
    finally:
        archive.close()


REFRESH_BUSY: Responses = {
    409: error("With refresh=true: another drift refresh has held the lock for over 60 s", headers=RETRY_AFTER)
}


@router.get("/drift", response_model=DriftReport, responses={**ADMIN, **INVALID, **REFRESH_BUSY})
async def drift(
    _: AdminUser,
    session: ReadSessionDep,
    writer: SessionDep,
    refresh_lock: DriftRefreshLockDep,
    registry: RegistryDep,
    settings: SettingsDep,
    refresh: Annotated[bool, Query(description="Compute the indices now instead of reading the last ones")] = False,
) -> DriftReport:
    """Drift per model version (admin): each signal's population stability index of the latest
    DRIFT_WINDOW_SIZE answered predictions against the version's first DRIFT_REFERENCE_SIZE, with
    both distributions side by side, or for a signal with too few values in either, how many each
    holds and why it has none (api.app.drift: the signals, the binning, the sources)."""
    if refresh:
        # In a transaction of its own: the refresh's lock lasts until it commits, where a read
        # session's statements would each commit (and release it) at once. The writer takes its
        # connection at its first statement, inside this process's lock.
        async with refresh_lock:
            await drift_service.refresh(
                session=writer,
                entries=registry.served(benchmark_mode=settings.benchmark_mode),
                reference_size=settings.drift_reference_size,
                window_size=settings.drift_window_size,
                bins=settings.drift_bins,
            )
        # Read on the same connection: a second one per request, taken while this one is held,
        # would let refreshes waiting for the pool hold all of it.
        session = writer
    return drift_service.report(
        rows=await drift_service.stored(session=session),
        reference_size=settings.drift_reference_size,
        window_size=settings.drift_window_size,
        bins=settings.drift_bins,
        now=datetime.now(UTC),
    )
