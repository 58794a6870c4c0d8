"""Export jobs: what admins ask for (queued), and what the runner of one API process at a time
does with each (claims it under a lease, reports progress, finishes or fails it)."""

from __future__ import annotations

import dataclasses
import logging
import re
import uuid
from datetime import timedelta
from pathlib import Path

from fastapi import HTTPException
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.exports.models import UNFINISHED, Export
from api.app.exports.schemas import ExportRequest
from api.app.feedback.export import ExportProgress
from api.app.feedback.service import hold_export_fence
from contracts.registry import Registry

log = logging.getLogger("api.exports")

EXPORTS_DIR = "exports"
"""Where finished and half-written zips live, under the storage directory."""
DOWNLOADS_DIR = f"{EXPORTS_DIR}/downloads"
"""Where the zip of a direct download (``GET /v1/admin/feedback-export``) is written, unnamed."""


def archive_name(export_id: uuid.UUID, attempt: int, *, part: bool = False) -> str:
    """The zip of one attempt at an export, relative to the storage directory (``part`` while it
    is written). Each attempt has files of its own, so a process that lost its lease but still
    runs never writes or deletes its successor's."""
    return f"{EXPORTS_DIR}/{export_id}.{attempt}.zip" + (".part" if part else "")


ARCHIVE = re.compile(
    r"^(?P<id>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\.\d+\.zip(?P<part>\.part)?$"
)
"""The name of a zip in EXPORTS_DIR (``archive_name``), finished or, with ``part``, being written."""


async def orphaned_archives(*, session: AsyncSession, names: list[str]) -> list[str]:
    """Of ``names`` (files in EXPORTS_DIR), the zips no export keeps: their export was deleted, or
    it ended with another zip or none (its zip forgotten after EXPORT_KEEP_DAYS by a process
    killed before it deleted the file; a process that had lost the export finishing it late), and
    the half-written ones (``.zip.part``) of exports deleted or ended (a process killed while
    writing one, whose export then failed or was cancelled). A zip of an export still queued or
    running is kept: its runner is writing it or about to record it."""
    matched = {name: m for name in names if (m := ARCHIVE.match(name))}
    named = {name: uuid.UUID(m["id"]) for name, m in matched.items()}
    if not named:
        return []
    rows = {
        row.id: row
        for row in await session.execute(
            select(Export.id, Export.status, Export.path).where(Export.id.in_(set(named.values())))
        )
    }
    await session.commit()
    orphaned = []
    for name, export_id in named.items():
        row = rows.get(export_id)
        if row is None or (
            row.status not in UNFINISHED and (matched[name]["part"] or row.path != f"{EXPORTS_DIR}/{name}")
        ):
            orphaned.append(name)
    return orphaned


def leftovers(storage_dir: Path, export_id: uuid.UUID) -> list[Path]:
    """Every file an export left in the storage directory, finished or half-written."""
    return list((storage_dir / EXPORTS_DIR).glob(f"{export_id}.*"))


def check_known(*, registry: Registry, model: str | None, version: int | None) -> None:
    """Raises 404 for a ``model`` the registry does not know, or a ``version`` it does not have
    (an export of nothing is a typo, not an empty archive); None: every model or version."""
    if model is None:
        return
    versions = {m.version for m in registry.models if m.name == model}
    if not versions:
        raise HTTPException(status_code=404, detail=f"No model named {model!r}.")
    if version is not None and version not in versions:
        raise HTTPException(status_code=404, detail=f"{model} has no version {version}.")


async def create_export(
    *, session: AsyncSession, registry: Registry, request: ExportRequest, requested_by: str
) -> Export:
    """Queues an export; a runner takes it up within EXPORT_POLL_SECONDS. Commits. Raises 404
    for a ``model`` the registry does not know, or a ``version`` it does not have."""
    check_known(registry=registry, model=request.model, version=request.version)
    export = Export(
        id=uuid.uuid4(),
        kind=request.kind,
        model=request.model,
        version=request.version,
        since_last=request.since_last,
        status="queued",
        rows_total=0,
        rows_done=0,
        bytes_written=0,
        requested_by=requested_by,
        attempts=0,
    )
    session.add(export)
    await session.commit()
    return export


async def list_exports(*, session: AsyncSession, skip: int, limit: int) -> tuple[list[Export], int]:
    """One page of every export, newest first (by id among those of one instant, so that pages
    neither repeat nor skip one), and how many there are in all."""
    count = await session.scalar(select(func.count()).select_from(Export))
    rows = await session.scalars(
        select(Export).order_by(Export.created_at.desc(), Export.id.desc()).offset(skip).limit(limit)
    )
    return list(rows), int(count or 0)


async def get_export(*, session: AsyncSession, export_id: uuid.UUID) -> Export:
    """The export; 404 when there is none with this id."""
    export = await session.get(Export, export_id)
    if export is None:
        raise HTTPException(status_code=404, detail="Export not found")
    return export


async def cancel_export(*, session: AsyncSession, export_id: uuid.UUID) -> Export:
    """Cancels a queued or running export: its runner stops at its next heartbeat or step and
    deletes what it wrote. Cancelling a cancelled one again changes nothing. Raises 404 for an
    unknown export, 409 for one that is done or failed. Commits."""
    cancelled = await session.scalar(
        update(Export)
        .where(Export.id == export_id, Export.status.in_(UNFINISHED))
        .values(status="cancelled", finished_at=func.now(), lease_owner=None, lease_expires_at=None)
        .returning(Export)
        .execution_options(populate_existing=True)
    )
    await session.commit()
    if cancelled is not None:
        log.info("export %s cancelled", export_id)
        return cancelled
    export = await get_export(session=session, export_id=export_id)
    if export.status != "cancelled":
        raise HTTPException(status_code=409, detail=f"The export is {export.status} already; nothing to cancel")
    return export


async def delete_export(*, session: AsyncSession, export_id: uuid.UUID) -> None:
    """Forgets an export (a running one stops as if cancelled); the caller deletes its files
    (``leftovers``). Raises 404 for an unknown export. Commits."""
    deleted = await session.scalar(delete(Export).where(Export.id == export_id).returning(Export.id))
    await session.commit()
    if deleted is None:
        raise HTTPException(status_code=404, detail="Export not found")


# --- the runner's side: each call one short transaction ---------------------------------------


async def expire_archives(*, session: AsyncSession, keep: timedelta) -> list[str]:
    """Forgets the zips of exports finished more than ``keep`` ago (the exports stay listed);
    their paths, for the caller to delete (each returned to one caller only). Commits."""
    old = (
        select(Export.id, Export.path)
        .where(Export.path.is_not(None), Export.finished_at < func.now() - keep)
        .with_for_update(skip_locked=True)
        .subquery()
    )
    paths = await session.scalars(
        update(Export)
        .where(Export.id == old.c.id)
        .values(path=None, error="Its zip was deleted after EXPORT_KEEP_DAYS; start a new export")
        .returning(old.c.path)
    )
    expired = [str(path) for path in paths]
    await session.commit()
    return expired


@dataclasses.dataclass(frozen=True)
class Claim:
    """An export a runner took up, and exports given up on that were running in dead processes."""

    export: Export | None
    abandoned: list[Export]


async def claim(*, session: AsyncSession, owner: str, lease_seconds: float, max_attempts: int) -> Claim:
    """Takes the oldest queued export, or one whose process stopped renewing its lease, for
    ``owner`` (``FOR UPDATE SKIP LOCKED``: two processes never take the same one). One whose
    process died ``max_attempts`` times is failed with the reason instead. An incremental export
    gets its window here: after the last finished export of the same options, up to now. Commits."""
    abandoned: list[Export] = []
    while True:
        export = await session.scalar(
            select(Export)
            .where(
                Export.status.in_(UNFINISHED),
                or_(Export.status == "queued", Export.lease_expires_at < func.now()),
            )
            .order_by(Export.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        if export is None:
            await session.commit()
            return Claim(None, abandoned)
        now = await session.scalar(select(func.now()))
        assert now is not None
        if export.status == "running":
            abandoned.append(export)
            log.warning(
                "export %s: its process %s stopped renewing its lease (attempt %d)",
                export.id,
                export.lease_owner,
                export.attempts,
            )
            if export.attempts >= max_attempts:
                export.status, export.finished_at, export.lease_owner = "failed", now, None
                export.error = (
                    f"The API process writing it stopped {export.attempts} times (no heartbeat for "
                    f"{lease_seconds:g} s); start a new export"
                )
                await session.commit()
                continue
        if export.until is None:
            if export.since_last:
                export.since = await session.scalar(
                    select(func.max(Export.until)).where(
                        Export.status == "done",
                        Export.kind == export.kind,
                        Export.model.is_not_distinct_from(export.model),
                        Export.version.is_not_distinct_from(export.version),
                    )
                )
            # Verdicts stamped up to this end have all committed; later ones are stamped after it.
            await hold_export_fence(session, exclusive=True)
            export.until = await session.scalar(select(func.clock_timestamp()))
        export.status, export.attempts, export.lease_owner = "running", export.attempts + 1, owner
        export.heartbeat_at, export.lease_expires_at = now, now + timedelta(seconds=lease_seconds)
        export.started_at = export.started_at or now
        export.rows_done = export.bytes_written = 0
        export.error = None
        await session.commit()
        return Claim(export, abandoned)


def _mine(export_id: uuid.UUID, owner: str) -> tuple[object, ...]:
    return (Export.id == export_id, Export.lease_owner == owner, Export.status == "running")


async def renew(
    *,
    session: AsyncSession,
    export_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    progress: ExportProgress | None = None,
) -> bool:
    """Renews ``owner``'s lease (and records ``progress``); False when the export is no longer
    its to run: cancelled, deleted or taken over. Commits."""
    values: dict[str, object] = {
        "heartbeat_at": func.now(),
        "lease_expires_at": func.now() + timedelta(seconds=lease_seconds),
    }
    if progress is not None:
        values |= {
            "rows_total": progress.rows_total,
            "rows_done": progress.rows_done,
            "bytes_written": progress.bytes_written,
            "summary": dataclasses.asdict(progress.summary),
        }
    renewed = await session.scalar(
        update(Export).where(*_mine(export_id, owner)).values(**values).returning(Export.id)  # type: ignore[arg-type]
    )
    await session.commit()
    return renewed is not None


async def finish(
    *, session: AsyncSession, export_id: uuid.UUID, owner: str, path: str, progress: ExportProgress
) -> bool:
    """Marks ``owner``'s export done with its zip at ``path``; False when it is no longer its own
    (the caller deletes the zip). Commits."""
    done = await session.scalar(
        update(Export)
        .where(*_mine(export_id, owner))  # type: ignore[arg-type]
        .values(
            status="done",
            path=path,
            finished_at=func.now(),
            rows_total=progress.rows_done,
            rows_done=progress.rows_done,
            bytes_written=progress.bytes_written,
            summary=dataclasses.asdict(progress.summary),
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(Export.id)
    )
    await session.commit()
    return done is not None


async def fail(*, session: AsyncSession, export_id: uuid.UUID, owner: str, error: str) -> bool:
    """Marks ``owner``'s export failed with why. Commits."""
    failed = await session.scalar(
        update(Export)
        .where(*_mine(export_id, owner))  # type: ignore[arg-type]
        .values(status="failed", error=error[:2000], finished_at=func.now(), lease_owner=None, lease_expires_at=None)
        .returning(Export.id)
    )
    await session.commit()
    return failed is not None


async def release(*, session: AsyncSession, export_id: uuid.UUID, owner: str) -> bool:
    """Puts ``owner``'s export back in the queue, its attempt not counted: the process is
    stopping, and another one takes it up at once rather than after the lease. Commits."""
    released = await session.scalar(
        update(Export)
        .where(*_mine(export_id, owner))  # type: ignore[arg-type]
        .values(
            status="queued",
            attempts=Export.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
            rows_done=0,
            bytes_written=0,
        )
        .returning(Export.id)
    )
    await session.commit()
    return released is not None
