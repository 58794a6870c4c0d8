"""The batch lane's loop, which every API process runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from api.app.batches import lane
from api.app.core.errors import outage_of
from api.app.predictions.background import JobRuntime
from contracts import keys, workers

log = logging.getLogger("api.batches")

POLL_SECONDS = 1.0
"""The longest the lane waits between two looks when no answer wakes it."""
ORPHAN_SWEEP_SECONDS = 15.0
"""How often the lane looks for batches left ``receiving`` by a process that stopped (an index
holds only the batches being received, so the look costs the same however many batches there are)
and for batches of deactivated accounts (the users table, then those accounts' batches by owner)."""


async def top_up_once(rt: JobRuntime, *, finish: bool = False) -> int:
    """One look: queues the next batch jobs when a batch is running (and with ``finish``, marks
    the batches whose every job is final ``done``); how many jobs it queued."""
    async with rt.sessionmaker() as session:
        if not await lane.any_running(session=session):
            return 0
        beats = await workers.live_heartbeats_async(rt.redis)
        queued = await lane.top_up(
            session=session,
            redis=rt.redis,
            store=rt.store,
            in_flight=rt.settings.batch_in_flight,
            job_seconds=rt.settings.batch_job_seconds,
            served=lane.servable(rt.live_registry.current, beats),
            retired=lane.retired_versions(rt.live_registry.current),
        )
        if finish:
            await lane.finish(session=session)
        return queued


async def cancel_orphaned_once(rt: JobRuntime) -> int:
    """Cancels the batches left ``receiving`` by a process that died (``lane.cancel_orphaned``) and
    those of deactivated accounts (``lane.cancel_of_deactivated_owners``); how many in all."""
    async with rt.sessionmaker() as session:
        stale_after = timedelta(seconds=rt.settings.batch_receive_timeout_seconds)
        cancelled = await lane.cancel_orphaned(session=session, stale_after=stale_after)
        stopped = await lane.cancel_of_deactivated_owners(session=session)
    if cancelled:
        log.warning("cancelled %d batches left receiving by a process that stopped", cancelled)
    if stopped:
        log.info("cancelled %d batches of deactivated accounts", stopped)
    return cancelled + stopped


async def run_lane(rt: JobRuntime, stop: asyncio.Event) -> None:
    """Tops the lane up whenever a batch's answer arrives (the result collector pushes to
    ``keys.BATCH_WAKE``) and at least every POLL_SECONDS, until ``stop``."""
    last_finish = last_sweep = 0.0
    while not stop.is_set():
        try:
            # Whether batches are over is asked once a second, not after every answer: it reads
            # every job of the running batches.
            finish = time.monotonic() - last_finish >= POLL_SECONDS
            await top_up_once(rt, finish=finish)
            if finish:
                last_finish = time.monotonic()
            if time.monotonic() - last_sweep >= ORPHAN_SWEEP_SECONDS:
                last_sweep = time.monotonic()
                await cancel_orphaned_once(rt)
            await rt.redis_blocking.blpop([keys.BATCH_WAKE], timeout=POLL_SECONDS)
        except Exception as exc:
            if dependency := outage_of(exc):
                rt.outage_log.report(dependency, exc)
            else:
                log.exception("batch lane failed")
        else:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=POLL_SECONDS)
