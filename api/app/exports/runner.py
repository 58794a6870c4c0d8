"""The export runner every API process runs: it takes up queued export jobs one at a time and
writes each to a zip under the storage directory, reading PostgreSQL a page at a time and writing
in a worker thread, while a heartbeat renews its lease. With several processes, each job is run by
the one that claimed it; a job whose process died is taken over (or failed) once its lease runs out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from anyio import to_thread
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.app.core.errors import OutageLog, is_outage
from api.app.core.tasks import run_every
from api.app.exports import service
from api.app.exports.models import Export
from api.app.feedback.export import (
    ExportInterrupted,
    ExportProgress,
    ExportWriter,
    Selection,
    ZipSink,
    write_export,
)
from api.app.images.storage import LocalBlobStore

log = logging.getLogger("api.exports")

EXPIRE_SECONDS = 60.0
"""How often each process looks for zips past their keeping time."""
RELEASE_SECONDS = 2.0
"""How long a stopping process tries to hand its export back before leaving it to the lease."""


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _zips_in(folder: Path) -> list[str]:
    return [path.name for path in (*folder.glob("*.zip"), *folder.glob("*.zip.part"))] if folder.is_dir() else []


@dataclass
class ExportRunner:
    """Runs export jobs in this process."""

    sessionmaker: async_sessionmaker[AsyncSession]
    """Transactions: claims, heartbeats, progress."""
    read_sessionmaker: async_sessionmaker[AsyncSession]
    """The pages of examples, each read on its own (no transaction held while files are written)."""
    store: LocalBlobStore
    storage_dir: Path
    batch_rows: int
    poll_seconds: float
    lease_seconds: float
    max_attempts: int
    keep_days: float = 7.0
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}")
    _expired_at: float = field(default=float("-inf"), init=False)

    async def run(self, stop: asyncio.Event, outage_log: OutageLog) -> None:
        """Looks for queued exports every ``poll_seconds`` and runs them until ``stop``."""

        async def step() -> None:
            await self.run_queued(stop)

        await run_every(self.poll_seconds, step, name="export runner", stop=stop, outage_log=outage_log)

    async def expire(self) -> int:
        """Deletes the zips of exports finished more than ``keep_days`` ago, and the zips no
        export keeps (``service.orphaned_archives``); how many of the first."""
        async with self.sessionmaker() as session:
            paths = await service.expire_archives(session=session, keep=timedelta(days=self.keep_days))
        await to_thread.run_sync(_remove, [self.storage_dir / path for path in paths])
        folder = self.storage_dir / service.EXPORTS_DIR
        names = await to_thread.run_sync(_zips_in, folder)
        async with self.sessionmaker() as session:
            orphaned = await service.orphaned_archives(session=session, names=names)
        if orphaned:
            await to_thread.run_sync(_remove, [folder / name for name in orphaned])
            log.warning("deleted %d export zips no export keeps (left by a process that stopped)", len(orphaned))
        return len(paths)

    async def run_queued(self, stop: asyncio.Event) -> int:
        """Runs exports one after the other while there are any to take up, after deleting the
        zips past their keeping time (once every EXPIRE_SECONDS); how many exports it ran."""
        if time.monotonic() - self._expired_at >= EXPIRE_SECONDS:
            self._expired_at = time.monotonic()
            if expired := await self.expire():
                log.info("deleted the zips of %d exports older than %g days", expired, self.keep_days)
        ran = 0
        while not stop.is_set():
            async with self.sessionmaker() as session:
                claimed = await service.claim(
                    session=session, owner=self.owner, lease_seconds=self.lease_seconds, max_attempts=self.max_attempts
                )
            for dead in claimed.abandoned:
                # What the dead process wrote; the claimed export writes a part of its own.
                await to_thread.run_sync(_remove, service.leftovers(self.storage_dir, dead.id))
            if claimed.export is None:
                return ran
            await self.run_one(claimed.export, stop)
            ran += 1
        return ran

    async def _renew(self, export_id: uuid.UUID, progress: ExportProgress | None = None) -> bool:
        async with self.sessionmaker() as session:
            return await service.renew(
                session=session,
                export_id=export_id,
                owner=self.owner,
                lease_seconds=self.lease_seconds,
                progress=progress,
            )

    async def _heartbeat(self, export_id: uuid.UUID, lost: threading.Event, interrupt: threading.Event) -> None:
        """Renews the lease every third of it, also while a step is slow (big files, a slow disk);
        sets ``lost`` (and stops the writer) once the export is no longer this process's:
        cancelled, deleted or taken over."""
        while not lost.is_set():
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                if not await self._renew(export_id):
                    lost.set()
                    interrupt.set()
            except Exception as exc:  # an outage: the lease may run out; the next beat tries again
                log.warning("export %s: heartbeat failed: %s", export_id, exc)

    async def _stopping(self, stop: asyncio.Event, interrupt: threading.Event) -> None:
        await stop.wait()
        interrupt.set()

    async def run_one(self, export: Export, stop: asyncio.Event) -> None:
        """Writes ``export`` (claimed by this process) to its zip and marks it done; failed with
        the reason when writing fails; back in the queue when the process stops meanwhile; and
        when it stops being this process's, it leaves it be and deletes what it wrote."""
        name = service.archive_name(export.id, export.attempts)
        part = self.storage_dir / service.archive_name(export.id, export.attempts, part=True)
        final = self.storage_dir / name
        lost = threading.Event()  # the export is not this process's any more
        interrupt = threading.Event()  # stops the writer between two files: lost, or the process stops

        async def on_progress(progress: ExportProgress) -> None:
            if not await self._renew(export.id, progress):
                lost.set()
                interrupt.set()
            if lost.is_set():
                raise ExportInterrupted

        selection = Selection(model=export.model, version=export.version, since=export.since, until=export.until)
        log.info("export %s: started (attempt %d, %s)", export.id, export.attempts, selection)
        helpers = [
            asyncio.create_task(self._heartbeat(export.id, lost, interrupt)),
            asyncio.create_task(self._stopping(stop, interrupt)),
        ]
        try:
            await to_thread.run_sync(lambda: part.parent.mkdir(parents=True, exist_ok=True))
            writer = await to_thread.run_sync(_writer, part, self.store, interrupt)
            summary = await write_export(
                read=self.read_sessionmaker,
                writer=writer,
                selection=selection,
                batch_rows=self.batch_rows,
                on_progress=on_progress,
            )
            await to_thread.run_sync(os.replace, part, final)
            size = await to_thread.run_sync(lambda: final.stat().st_size)
            done = summary.examples + summary.missing
            async with self.sessionmaker() as session:
                finished = await service.finish(
                    session=session,
                    export_id=export.id,
                    owner=self.owner,
                    path=name,
                    progress=ExportProgress(done, done, size, summary),
                )
            if not finished:
                raise ExportInterrupted
            log.info("export %s: done, %d images, %d bytes", export.id, summary.examples, size)
        except ExportInterrupted:
            await to_thread.run_sync(_remove, [part, final])
            if lost.is_set():
                log.info("export %s: stopped, no longer this process's (cancelled, deleted or taken over)", export.id)
            elif stop.is_set():
                await self._release(export.id)
            else:
                log.info("export %s: stopped, its file was deleted (cancelled or deleted meanwhile)", export.id)
        except asyncio.CancelledError:
            await to_thread.run_sync(_remove, [part])
            await self._release(export.id)
            raise
        except Exception as exc:
            if is_outage(exc):
                # An outage (PostgreSQL refusing or hanging) is no fault of the export: back to
                # the queue if PostgreSQL is back, else its lease runs out and it is taken up again.
                await to_thread.run_sync(_remove, [part])
                await self._release(export.id)
                raise
            log.exception("export %s failed", export.id)
            await to_thread.run_sync(_remove, [part])
            async with self.sessionmaker() as session:
                await service.fail(
                    session=session, export_id=export.id, owner=self.owner, error=f"{type(exc).__name__}: {exc}"
                )
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _release(self, export_id: uuid.UUID) -> None:
        """Hands the export back to the queue (best effort: else its lease runs out)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(RELEASE_SECONDS):
                async with self.sessionmaker() as session:
                    if await service.release(session=session, export_id=export_id, owner=self.owner):
                        log.info("export %s: handed back to the queue", export_id)


def _writer(part: Path, store: LocalBlobStore, interrupt: threading.Event) -> ExportWriter:
    return ExportWriter(ZipSink(part), store, interrupt)
