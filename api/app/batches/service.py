"""Batches: many images, the same model versions, one id to follow them by. Every image is
checked as a single upload is (the bad ones are listed with the reason, the rest go on), identical
images are computed once, and the jobs go through the batch lane (``lane``)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import uuid
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, cast

from anyio import to_thread
from fastapi import HTTPException, UploadFile
from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    Table,
    Text,
    and_,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from api.app.batches import archive, lane
from api.app.batches.lane import OPEN
from api.app.batches.models import Batch, BatchItem
from api.app.batches.schemas import BatchCounts
from api.app.catalog.service import ModelAvailability, WorkerDirectory, resolve_models
from api.app.core.config import Settings
from api.app.core.errors import DB_ERRORS, is_outage
from api.app.core.fields import INT32_MAX, shown_safely, storable
from api.app.core.paging import opaque, unwrap
from api.app.images import service as images_service
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions.models import Job, Prediction
from contracts import imaging, keys, spreadsheets
from contracts.messages import PredictionStatus
from contracts.registry import ModelEntry, Registry

log = logging.getLogger("api.batches")
_jobs = cast(Table, Job.__table__)
_predictions = cast(Table, Prediction.__table__)
_items = cast(Table, BatchItem.__table__)
_batches = cast(Table, Batch.__table__)
_images = cast(Table, Image.__table__)
PLACEHOLDER_DEADLINE = timedelta(days=30)
"""A pending job's deadline until the lane queues it and gives it a real one."""
PACE_WINDOW_SECONDS = 60.0
"""The ETA of a batch follows the pace of its answers over this many seconds."""
RECEIVED_NOTES_PER_TIMEOUT = 10
"""How often a request receiving a batch notes that it still is (``Batch.received_at``): this many
times per BATCH_RECEIVE_TIMEOUT_SECONDS."""


@dataclass
class _Builder:
    """What one batch request has stored so far."""

    batch: Batch
    entries: list[ModelEntry]
    owner_id: int
    items: list[dict[str, Any]] = field(default_factory=list)
    jobs_of: dict[str, tuple[uuid.UUID, uuid.UUID]] = field(default_factory=dict)
    """By SHA-256: the image and the job identical images share."""
    written: int = 0
    """Items inserted so far."""
    cut_off: bool = False
    """Set once the batch was found cancelled while it was received: no more files are stored."""
    batch_id: uuid.UUID = field(init=False)
    """Read once: a rollback expires ``batch``, whose attributes cannot load on their own then."""

    def __post_init__(self) -> None:
        self.batch_id = self.batch.id

    def skipped(self, name: str, reason: str) -> None:
        self.items.append(self._item(name, error=reason))

    def _item(self, name: str, **values: Any) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "batch_id": self.batch_id,
            "position": len(self.items),
            "file_name": (name if storable(name) else name.encode("utf-8", "replace").decode("utf-8"))[:255],
            "sha256": None,
            "image_id": None,
            "job_id": None,
            "error": None,
            **values,
        }


def _file_name(name: str) -> str:
    """A batch file's name as listed: without NUL characters, at most 255 characters, its control
    characters and text-direction overrides shown as U+FFFD (``core.fields.shown_safely``)."""
    return shown_safely(name.replace("\x00", "")[:255]) or "unnamed"


async def _queued_images(session: AsyncSession, owner_id: int) -> int:
    """The owner's batch images waiting: the open jobs of their received batches, and every image
    planned for a batch still being received (whose jobs are being made), under a lock per owner
    held to the caller's commit, so that batches sent at once are counted one after another and
    each sees the others' images before it makes its own."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), {"key": f"batch-quota:{owner_id}"}
    )
    receiving = select(Batch.id, Batch.entries).where(Batch.owner_id == owner_id, Batch.status == "receiving")
    being_received = (await session.execute(receiving)).all()
    jobs = (
        select(func.count())
        .select_from(Job)
        .where(
            Job.owner_id == owner_id,
            Job.status.in_(OPEN),
            Job.request_id.startswith(keys.BATCH_REQUEST_PREFIX),
            Job.request_id.not_in([f"{keys.BATCH_REQUEST_PREFIX}{batch_id}" for batch_id, _ in being_received]),
        )
    )
    return int(await session.scalar(jobs) or 0) + sum(entries for _, entries in being_received)


async def _add_job(session: AsyncSession, b: _Builder, image_id: uuid.UUID) -> uuid.UUID:
    now = datetime.now(UTC)
    job_id = uuid.uuid4()
    await session.execute(
        insert(_jobs),
        {
            "id": job_id,
            "owner_id": b.owner_id,
            "image_id": image_id,
            "status": PredictionStatus.pending.value,
            "request_id": f"{keys.BATCH_REQUEST_PREFIX}{b.batch.id}",
            "deadline_at": now + PLACEHOLDER_DEADLINE,
            "finished_at": None,
            "created_at": now,
        },
    )
    await session.execute(
        insert(_predictions),
        [
            {
                "id": uuid.uuid4(),
                "job_id": job_id,
                "position": position,
                "model_name": entry.name,
                "model_version": entry.version,
                "status": PredictionStatus.pending.value,
                "top_k": [],
                "cached": False,
                "random_weights": False,
                "created_at": now,
            }
            for position, entry in enumerate(b.entries)
        ],
    )
    return job_id


async def _still_there(session: AsyncSession, b: _Builder, sha256: str) -> bool:
    """Whether an identical earlier file of the batch got an image and a job that are still there,
    locked for the transaction as the item's foreign keys would lock them (so they stay until it
    commits). Their owner may have deleted that image meanwhile: it is then forgotten, and the file
    is stored anew (an item naming the deleted rows failed the whole batch)."""
    known = b.jobs_of.get(sha256)
    if known is None:
        return False
    image_id, job_id = known
    # The image's row, as a delete takes it (then its jobs'): locking the job first could deadlock.
    found = await session.scalar(
        select(_images.c.id)
        .join(_jobs, _jobs.c.image_id == _images.c.id)
        .where(_images.c.id == image_id, _jobs.c.id == job_id)
        .with_for_update(key_share=True, of=_images)
    )
    if found is None:
        del b.jobs_of[sha256]
        return False
    return True


async def _add_image(
    session: AsyncSession, store: LocalBlobStore, settings: Settings, b: _Builder, name: str, data: bytes
) -> None:
    """One file of the batch: skipped with the reason an upload would get, or stored with its job
    (one job for identical images). Commits: a file's transaction holds its own blob lock only,
    so two requests storing the same files in other orders never wait for each other in a circle."""
    try:
        info, sha256 = await images_service.inspect_upload(data, settings)
    except HTTPException as exc:
        b.skipped(name, str(exc.detail))
        return
    if await _still_there(session, b, sha256):
        image_id, job_id = b.jobs_of[sha256]
        b.items.append(b._item(name, sha256=sha256, image_id=image_id, job_id=job_id))
        await _flush(session, b)
        return
    try:
        image = await images_service.add_image(
            session=session,
            store=store,
            owner_id=b.owner_id,
            data=data,
            info=info,
            sha256=sha256,
            filename=name,
            source="batch",
        )
        b.jobs_of[sha256] = (image.id, await _add_job(session, b, image.id))
        b.items.append(b._item(name, sha256=sha256, image_id=image.id, job_id=b.jobs_of[sha256][1]))
        await _flush(session, b)
    except BaseException:
        # The file's transaction failed after its blob may have been written (the batch's
        # request fails with it): the blob goes unless another upload has it.
        await images_service.forget_blob(session=session, store=store, sha256=sha256)
        raise


async def _keep_alive(engine: AsyncEngine, b: _Builder, every: float) -> None:
    """Sets the batch's ``received_at`` every ``every`` seconds while it is ``receiving``, each time
    in a statement of its own, until cancelled: the lane and a request sent again with the
    batch's key know the process receiving it is alive (``lane.cancel_orphaned``, ``_replayed``),
    however long one file takes. Once the batch is no longer ``receiving`` (cancelled meanwhile:
    by its owner, or by the lane after this process stalled), sets ``b.cut_off`` and stops, so
    that the request stores no more files. A failed note is logged; the next one may succeed."""
    while True:
        await asyncio.sleep(every)
        try:
            async with engine.begin() as conn:
                noted = await conn.execute(
                    update(_batches)
                    .where(_batches.c.id == b.batch_id, _batches.c.status == "receiving")
                    .values(received_at=func.now())
                )
            if noted.rowcount == 0:
                b.cut_off = True
                return
        except DB_ERRORS as exc:
            log.warning("batch %s: could not note that it is still being received: %s", b.batch_id, exc)
        except Exception:  # a note that failed otherwise must not end the notes that follow
            log.exception("batch %s: could not note that it is still being received", b.batch_id)


async def _flush(session: AsyncSession, b: _Builder) -> None:
    if len(b.items) > b.written:
        await session.execute(insert(_items), b.items[b.written :])
    b.written = len(b.items)
    await session.commit()


Planned = list[tuple[UploadFile, zipfile.ZipFile | None, list[archive.Member]]]
"""Each upload with its opened zip and the zip's checked listing (None and [] for an image)."""


async def _plan(files: list[UploadFile], settings: Settings, extra: int) -> Planned:
    """Each upload with its zip's checked listing; refuses the batch (413, 422) before anything
    is stored."""
    planned: Planned = []
    entries, total = extra, 0
    for upload in files:
        name = _file_name(upload.filename or "")
        head = await upload.read(imaging.HEAD_BYTES)
        await upload.seek(0)
        if not archive.is_zip(head, name):
            planned.append((upload, None, []))
            entries += 1
            total += upload.size or 0
            continue
        try:
            opened = await to_thread.run_sync(
                functools.partial(archive.open_archive, cast(IO[bytes], upload.file), label=name)
            )
            members = await to_thread.run_sync(
                functools.partial(
                    archive.members,
                    opened,
                    label=name,
                    max_entries=settings.max_batch_images - entries,
                    batch_limit=settings.max_batch_images,
                    max_bytes=settings.max_batch_bytes - total,
                    max_file_bytes=settings.max_upload_bytes,
                )
            )
        except archive.ArchiveRefused as exc:
            raise HTTPException(status_code=exc.status, detail=exc.message) from None
        entries += len(members)
        total += sum(m.info.file_size for m in members if m.info is not None)
        planned.append((upload, opened, members))
    if entries > settings.max_batch_images:
        raise HTTPException(
            status_code=413,
            detail=f"{entries:,} images (files, zip entries and image ids); a batch takes at most "
            f"{settings.max_batch_images:,} (MAX_BATCH_IMAGES).",
        )
    if entries == 0:
        raise HTTPException(status_code=422, detail=EMPTY)
    return planned


EMPTY = "The batch is empty: send images, a zip of images, or image ids."

FINGERPRINT_CHUNK = 1 << 20
"""Bytes read at a time when a keyed request's files are hashed."""


def _fingerprint(files: list[tuple[str, IO[bytes]]], image_ids: list[uuid.UUID], refs: list[str]) -> str:
    digest = hashlib.sha256(json.dumps({"models": refs, "image_ids": [str(i) for i in image_ids]}).encode("utf-8"))
    for name, body in files:
        body.seek(0)
        file_digest = hashlib.sha256()
        while chunk := body.read(FINGERPRINT_CHUNK):
            file_digest.update(chunk)
        body.seek(0)
        digest.update(json.dumps([name, file_digest.hexdigest()]).encode("utf-8"))
    return digest.hexdigest()


async def request_fingerprint(*, files: list[UploadFile], image_ids: list[uuid.UUID], refs: list[str]) -> str:
    """SHA-256 (64 hex digits) of what a batch request asks for: the model references as sent,
    the image ids, and each file's name and content, in order. Reads every file once more, in a
    worker thread, and leaves it at its start."""
    named = [(upload.filename or "", cast(IO[bytes], upload.file)) for upload in files]
    return await to_thread.run_sync(functools.partial(_fingerprint, named, image_ids, refs))


async def _replayed(
    session: AsyncSession, *, owner_id: int, idempotency_key: str, fingerprint: str, settings: Settings
) -> Batch | None:
    """The owner's batch made by a request with ``idempotency_key``, None when there is none.
    Raises 422 (with ``Location``) when that request asked for something else, 409 (with
    ``Location`` and ``Retry-After``) while it is still being received. A batch still
    ``receiving`` whose process stopped noting it (BATCH_RECEIVE_TIMEOUT_SECONDS) is cancelled
    here, and None returned: the request sent again is the batch now."""
    stale_after = timedelta(seconds=settings.batch_receive_timeout_seconds)
    found = (
        await session.execute(
            select(Batch, lane.left_by_its_process(stale_after)).where(
                Batch.owner_id == owner_id, Batch.idempotency_key == idempotency_key
            )
        )
    ).first()
    if found is None:
        return None
    batch, orphaned = found
    if orphaned:
        # The process receiving it stopped (its notes stopped): cancelled now, it lets go of the
        # key, and this request (the same files or, after a change, others) is the batch now.
        log.warning("batch %s: left receiving by a process that stopped; sent again, it is made anew", batch.id)
        await lane.cancel(session=session, batch=batch, only_if=("receiving",))
        return None
    if batch.request_fingerprint != fingerprint:
        raise HTTPException(
            status_code=422,
            detail=f"This Idempotency-Key was sent before with other files, image ids or models (batch {batch.id}); "
            "a new batch needs a new key.",
            headers={"Location": f"/v1/batches/{batch.id}"},
        )
    if batch.status == "receiving":
        raise HTTPException(
            status_code=409,
            detail=f"The batch sent with this Idempotency-Key is still being received: follow "
            f"GET /v1/batches/{batch.id}, or send it again in a moment.",
            headers={"Location": f"/v1/batches/{batch.id}", "Retry-After": str(settings.retry_after_seconds)},
        )
    return batch


async def _insert_batch(session: AsyncSession, values: dict[str, Any]) -> Batch | None:
    """Inserts a ``receiving`` batch and commits; None when its owner already has a batch with its
    idempotency key (the unique index settles two requests sent at once)."""
    batch = await session.scalar(
        pg_insert(Batch)
        .values(id=uuid.uuid4(), status="receiving", **values)
        .on_conflict_do_nothing(index_elements=["owner_id", "idempotency_key"])
        .returning(Batch)
    )
    await session.commit()
    return batch


async def create_batch(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    workers: WorkerDirectory,
    registry: Registry,
    settings: Settings,
    owner_id: int,
    files: list[UploadFile],
    image_ids: list[uuid.UUID],
    refs: list[str],
    idempotency_key: str | None = None,
) -> tuple[Batch, bool]:
    """Stores a batch of ``files`` (images, or zips of images) and of the user's stored images
    ``image_ids``, each to be classified by the model versions ``refs`` name (the default model
    when empty), and returns it ``running`` (its jobs wait for the batch lane) with False.

    With an ``idempotency_key`` (the ``Idempotency-Key`` header, draft-ietf-httpapi-idempotency-key-header):
    when the owner already sent a batch with it, that batch is returned as it is now, with True,
    and nothing is stored (no quota is checked either: it is the same batch). Raises 422 when that
    batch's request asked for other files, image ids or models (``request_fingerprint``), 409 while
    it is still being received. A batch cancelled before it was fully received no longer holds its key.

    Files that are no acceptable image, nested archives, encrypted, oversized (past
    MAX_UPLOAD_BYTES) or bzip2/LZMA entries and ids of images that are not the user's are listed as
    skipped with the reason. Raises 413 (more files than MAX_BATCH_IMAGES, or more bytes than
    MAX_BATCH_BYTES: the files and the zip entries to unpack), 422 (no models known by those names,
    an empty batch, an unreadable zip, an entry name outside the archive), 429 (more than
    MAX_BATCH_IMAGES_QUEUED_PER_USER of the user's batch images waiting), 503 (a model not served
    yet); 422 also when no file at all is an image (nothing to do)."""
    if not files and not image_ids:
        # Said before the models are looked up: no worker coming back would make it a batch.
        raise HTTPException(status_code=422, detail=EMPTY)
    fingerprint = None
    if idempotency_key is not None:
        fingerprint = await request_fingerprint(files=files, image_ids=image_ids, refs=refs)
        kept = await _replayed(
            session, owner_id=owner_id, idempotency_key=idempotency_key, fingerprint=fingerprint, settings=settings
        )
        if kept is not None:
            return kept, True
    # Planned first (the zips' directories only): an empty batch is 422 whatever serves its models.
    planned = await _plan(files, settings, len(image_ids))
    # A version no live worker serves now (its worker restarting, or loading it) is taken: the
    # batch waits for it, as for a worker that stops once the batch is in, rather than 503 after
    # the whole upload was read.
    entries = resolve_models(
        refs,
        registry=registry,
        availability=await workers.availability(),
        settings=settings,
        user_id=owner_id,
        wait=True,
    )
    images_planned = len(image_ids) + sum(len(members) if zf else 1 for _u, zf, members in planned)
    waiting = await _queued_images(session, owner_id)
    cap = settings.max_batch_images_queued_per_user
    if waiting + images_planned > cap:
        if images_planned > cap:
            # No wait makes room for it: no Retry-After, which would say otherwise.
            raise HTTPException(
                status_code=429,
                detail=f"This batch has {images_planned:,} images; at most {cap:,} of yours may wait at once "
                "(MAX_BATCH_IMAGES_QUEUED_PER_USER): send them as several smaller batches.",
            )
        raise HTTPException(
            status_code=429,
            detail=f"You have {waiting:,} batch images still waiting, and with this batch's {images_planned:,} "
            f"that would make {waiting + images_planned:,}; at most {cap:,} may wait at once "
            "(MAX_BATCH_IMAGES_QUEUED_PER_USER). "
            "Wait for a batch to finish or cancel one.",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )
    values = {
        "owner_id": owner_id,
        "models": [e.key for e in entries],
        "entries": images_planned,
        "idempotency_key": idempotency_key,
        "request_fingerprint": fingerprint,
        "fully_received": False,
    }
    batch = await _insert_batch(session, values)
    if batch is None:  # the same request, sent at the same moment, made it first
        assert idempotency_key is not None and fingerprint is not None
        kept = await _replayed(
            session, owner_id=owner_id, idempotency_key=idempotency_key, fingerprint=fingerprint, settings=settings
        )
        if kept is not None:
            return kept, True
        # ... and was cancelled meanwhile, letting go of its key.
        batch = await _insert_batch(session, values)
        if batch is None:
            raise HTTPException(
                status_code=409,
                detail="Another request with this Idempotency-Key is being received; send it again in a moment.",
                headers={"Retry-After": str(settings.retry_after_seconds)},
            )
    b = _Builder(batch=batch, entries=entries, owner_id=owner_id)
    every = settings.batch_receive_timeout_seconds / RECEIVED_NOTES_PER_TIMEOUT
    alive = asyncio.create_task(_keep_alive(cast(AsyncEngine, session.bind), b, every))
    try:
        await _receive(session, store, settings, b, planned, image_ids)
    except BaseException:
        await _abandon(session, b)
        raise
    finally:
        alive.cancel()
    # The owner's row until the last commit: deleting the user waits for it, or came first (401).
    await images_service.lock_owner(session=session, owner_id=owner_id)
    # Locked: a cancel, by its owner or by the lane's sweep of orphaned batches, is seen here or
    # waits for this commit.
    await session.refresh(batch, with_for_update=True)
    if batch.status == "cancelled":  # cancelled while it was being received
        await _flush(session, b)
        await lane.cancel(session=session, batch=batch)
        return batch, False
    if not b.jobs_of:
        # Refused: nothing was stored and nothing waits, so the request leaves no batch behind
        # (its items go with it).
        await session.execute(delete(Batch).where(Batch.id == batch.id))
        await session.commit()
        reasons = "; ".join(f"{item['file_name']}: {item['error']}" for item in b.items[:5])
        raise HTTPException(
            status_code=422, detail=f"No file of the batch is an image the portal can read ({reasons})."
        )
    batch.status, batch.entries, batch.fully_received = "running", len(b.items), True
    session.add(batch)
    await _flush(session, b)
    return batch, False


async def _abandon(session: AsyncSession, b: _Builder) -> None:
    """After a failure while receiving: whatever was stored goes nowhere, the batch and its jobs
    are cancelled, not left half-received. Of the items not yet written, only the skipped files
    are: the others name images and jobs the rollback took back or their owner deleted (every
    stored file's item was committed with its job). Nothing when the batch went with its owner. A
    failure here is logged: the caller raises the one that stopped the batch."""
    try:
        await session.rollback()
        batch = await session.get(Batch, b.batch_id, populate_existing=True)
        if batch is None:
            return
        skipped = [item for item in b.items[b.written :] if item["job_id"] is None]
        if skipped:
            await session.execute(insert(_items), skipped)
        await lane.cancel(session=session, batch=batch)
    except Exception as exc:
        if not is_outage(exc):
            log.exception("batch %s: could not be cancelled after a failed upload", b.batch_id)
            await session.rollback()
            return
        # An outage (PostgreSQL refusing, shutting down or starting): the batch stays
        # ``receiving``, and the lane cancels it once PostgreSQL is back.
        log.warning(
            "batch %s: could not be cancelled after a failed upload (%r); cancelled as left receiving later",
            b.batch_id,
            exc,
        )
        with contextlib.suppress(Exception):
            await session.rollback()


async def _receive(
    session: AsyncSession,
    store: LocalBlobStore,
    settings: Settings,
    b: _Builder,
    planned: Planned,
    image_ids: list[uuid.UUID],
) -> None:
    """Stores every planned file and stored image of the batch with its job (or as skipped), or
    stops once ``b.cut_off``."""
    for upload, opened, members in planned:
        if b.cut_off:
            return
        name = _file_name(upload.filename or "")
        if opened is None:
            data = await upload.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                b.skipped(name, f"larger than {settings.max_upload_bytes:,} bytes")
            else:
                await _add_image(session, store, settings, b, name, data)
            continue
        for member in members:
            if b.cut_off:
                break
            member_name = _file_name(member.name)
            if member.info is None:
                b.skipped(member_name, member.error or "skipped")
                continue
            read = functools.partial(archive.read_member, opened, member, max_file_bytes=settings.max_upload_bytes)
            content, error = await to_thread.run_sync(read)
            if content is None:
                b.skipped(member_name, error or "cannot be read")
            else:
                await _add_image(session, store, settings, b, member_name, content)
        opened.close()
    # Read in one statement: a batch of ten thousand ids that are not the user's was two round
    # trips each (half a minute), only to be refused. Each one owned is read again below, locked.
    mine = select(Image.id).where(Image.owner_id == b.owner_id, Image.id.in_(image_ids))
    owned = set(await session.scalars(mine)) if image_ids else set()
    for image_id in image_ids:
        if b.cut_off:
            return
        if image_id not in owned:
            b.skipped(str(image_id), "not one of your images")
            continue
        # The owner's row before the job's insert locks the image: deleting the user takes it first too.
        await images_service.lock_owner(session=session, owner_id=b.owner_id)
        image = await images_service.get_owned_image(session=session, owner_id=b.owner_id, image_id=image_id)
        if image is None:
            b.skipped(str(image_id), "not one of your images")
            continue
        if not await _still_there(session, b, image.sha256):
            b.jobs_of[image.sha256] = (image.id, await _add_job(session, b, image.id))
        _, job_id = b.jobs_of[image.sha256]
        b.items.append(b._item(image.filename or str(image.id), sha256=image.sha256, image_id=image.id, job_id=job_id))


async def get_owned_batch(*, session: AsyncSession, owner_id: int, batch_id: uuid.UUID) -> Batch | None:
    return await session.scalar(select(Batch).where(Batch.id == batch_id, Batch.owner_id == owner_id))


async def list_batches(
    *, session: AsyncSession, owner_id: int, skip: int, limit: int, idempotency_key: str | None = None
) -> tuple[list[Batch], int]:
    """The user's batches, newest first, and how many there are; with ``idempotency_key``, only
    the batch a request with that key made (a batch cancelled before it was fully received has
    let go of its key)."""
    mine = Batch.owner_id == owner_id
    if idempotency_key is not None:
        mine = and_(mine, Batch.idempotency_key == idempotency_key)
    count = await session.scalar(select(func.count()).select_from(Batch).where(mine))
    rows = await session.scalars(
        select(Batch).where(mine).order_by(Batch.created_at.desc(), Batch.id).offset(skip).limit(limit)
    )
    return list(rows), int(count or 0)


_MISSED = (PredictionStatus.failed.value, PredictionStatus.expired.value, PredictionStatus.cancelled.value)


async def counts(*, session: AsyncSession, batch: Batch) -> BatchCounts:
    """Images by state (an image counts once however many files carried it; ``done`` once one of
    its models answered, ``partly_answered`` when another's answer is missing), files skipped, files
    whose image was deleted since, and
    an estimate of the seconds left from the pace of the last minute, or since the batch was
    received when that is shorter (None before any answer)."""
    jobs = select(BatchItem.job_id).where(BatchItem.batch_id == batch.id, BatchItem.job_id.is_not(None)).distinct()
    grouped = await session.execute(select(Job.status, func.count()).where(Job.id.in_(jobs)).group_by(Job.status))
    by_status: dict[str, int] = {status: n for status, n in grouped}
    jobless = await session.execute(
        select(BatchItem.error.is_(None), func.count())
        .where(BatchItem.batch_id == batch.id, BatchItem.job_id.is_(None))
        .group_by(BatchItem.error.is_(None))
    )
    # Without a job: skipped (with why), or accepted and then deleted with its image (no reason).
    by_kind: dict[bool, int] = {deleted: n for deleted, n in jobless}
    now = datetime.now(UTC)
    recent = await session.scalar(
        select(func.count()).where(Job.id.in_(jobs), Job.finished_at > now - timedelta(seconds=PACE_WINDOW_SECONDS))
    )
    partly = await session.scalar(
        select(func.count(func.distinct(Job.id)))
        .join(Prediction, Prediction.job_id == Job.id)
        .where(Job.id.in_(jobs), Job.status == PredictionStatus.done.value, Prediction.status.in_(_MISSED))
    )
    # A batch whose images were queued less than the window ago answered them in less time than
    # that: counted from its last note of being received (a long upload's minutes are no pace).
    queued_since = max(batch.created_at, batch.received_at or batch.created_at)
    window = min(PACE_WINDOW_SECONDS, max(1.0, (now - queued_since).total_seconds()))
    waiting = sum(by_status.get(s, 0) for s in OPEN)
    queued = by_status.get(PredictionStatus.pending.value, 0) + by_status.get(PredictionStatus.queued.value, 0)
    failed = by_status.get(PredictionStatus.failed.value, 0) + by_status.get(PredictionStatus.expired.value, 0)
    eta = round(waiting / (recent / window)) if recent and waiting else (0 if not waiting else None)
    return BatchCounts(
        images=sum(by_status.values()),
        queued=queued,
        running=by_status.get(PredictionStatus.running.value, 0),
        done=by_status.get(PredictionStatus.done.value, 0),
        partly_answered=int(partly or 0),
        failed=failed,
        cancelled=by_status.get(PredictionStatus.cancelled.value, 0),
        skipped=by_kind.get(False, 0),
        deleted=by_kind.get(True, 0),
        eta_seconds=eta,
    )


RESULT_COLUMNS = ("file_name", "sha256", "model", "version", "status", "label", "score", "top_5", "error")


DELETED = "deleted"
"""The status of a result row whose image was deleted after the batch received it."""
IMAGE_DELETED = "its image was deleted after the batch received it"
"""The reason of a row whose file was accepted, then deleted with its answers (DELETE /v1/images)."""


RESULTS_PAGE_ROWS = 100
"""Rows of a page of a batch's results (JSON) unless ``limit`` says otherwise."""
MAX_RESULTS_PAGE_ROWS = 200
"""The most rows a page of a batch's results (JSON) has: a page is built on the event loop."""
CSV_CHUNK_ROWS = 500
"""Rows of a batch's CSV read (one keyset query) and formatted (in a worker thread) at a time:
a few milliseconds of the event loop each, however large the batch."""


@dataclass(frozen=True)
class ResultKey:
    """Where a result row stands in its batch's order: its file's position and id (positions are
    not unique in the schema; the id settles a tie), then its model's position (unique in a job:
    the model's place in the batch's ``models``). The batch is part of it: a cursor of one batch's
    results given for another's is refused, not read as a position there."""

    batch_id: uuid.UUID
    position: int
    item_id: uuid.UUID
    model_position: int

    def encode(self) -> str:
        """An opaque, URL-safe cursor (base64 of ``<batch id>|<position>|<item id>|<model position>``)."""
        return opaque(f"{self.batch_id}|{self.position}|{self.item_id}|{self.model_position}")

    @classmethod
    def decode(cls, text: str) -> ResultKey:
        """The key ``encode`` made; ValueError for anything else."""
        try:
            batch_id, position, item_id, model_position = unwrap(text).split("|")
            key = cls(uuid.UUID(batch_id), int(position), uuid.UUID(item_id), int(model_position))
        except ValueError as exc:
            raise ValueError("not a cursor this API gave") from exc
        if not (0 <= key.position <= INT32_MAX and -1 <= key.model_position <= INT32_MAX):
            raise ValueError("not a cursor this API gave")
        return key


def _row_status(item: Any) -> ColumnElement[str]:
    """A result row's status: its prediction's, else ``skipped`` (its file has a reason) or
    ``deleted`` (a file accepted, whose image and answers were deleted since)."""
    return func.coalesce(Prediction.status, case((func.coalesce(item.c.error, "") != "", "skipped"), else_=DELETED))


def _results_select(
    batch_id: uuid.UUID, *, after: ResultKey | None, status: str | None, limit: int
) -> Select[*tuple[Any, ...]]:
    """The batch's result rows after ``after`` (from the first when None), in its order (file
    position, file id, model position), at most ``limit``; only those in ``status`` when given.
    Plain columns, not ORM objects: thousands of them are read for a CSV.

    The files are chosen first, by the (batch_id, position) index: each has a row in ``status``
    (a file without a job has its one row, skipped or deleted; one with a job has a row per
    prediction), so the key's own file (whose rows may all come before the key) and ``limit``
    more hold the page. Their predictions are then found by job, however many the table holds."""
    items = select(BatchItem).where(BatchItem.batch_id == batch_id)
    if after is not None:
        items = items.where(
            tuple_(BatchItem.position, BatchItem.id) >= tuple_(literal(after.position), literal(after.item_id))
        )
    if status in ("skipped", DELETED):
        reason = func.coalesce(BatchItem.error, "") != ""
        items = items.where(BatchItem.job_id.is_(None), reason if status == "skipped" else ~reason)
    elif status is not None:
        answers = select(Prediction.id).where(Prediction.job_id == BatchItem.job_id, Prediction.status == status)
        items = items.where(answers.exists())
    item = items.order_by(BatchItem.position, BatchItem.id).limit(limit + 1).subquery()
    model_position = func.coalesce(Prediction.position, -1)
    query = select(
        item.c.position,
        item.c.id,
        model_position.label("model_position"),
        item.c.file_name,
        item.c.sha256,
        item.c.error.label("item_error"),
        Prediction.id.label("prediction_id"),
        Prediction.model_name,
        Prediction.model_version,
        _row_status(item).label("status"),
        Prediction.label,
        Prediction.score,
        # As text: the CSV decodes it in its worker thread, not on the event loop.
        Prediction.top_k.cast(Text).label("top_k"),
        Prediction.error.label("prediction_error"),
    ).outerjoin(Prediction, Prediction.job_id == item.c.job_id)
    if status is not None:
        query = query.where(_row_status(item) == status)
    if after is not None:
        query = query.where(
            tuple_(item.c.position, item.c.id, model_position)
            > tuple_(literal(after.position), literal(after.item_id), literal(after.model_position))
        )
    return query.order_by(item.c.position, item.c.id, model_position).limit(limit)


def _result(row: Row[Any]) -> dict[str, Any]:
    """A result row as RESULT_COLUMNS, with ``top_5`` as a list of {label, score}."""
    answered = row.prediction_id is not None
    return {
        "file_name": row.file_name,
        "sha256": row.sha256 or "",
        "model": row.model_name if answered else "",
        "version": row.model_version,
        "status": row.status,
        "label": row.label,
        "score": row.score,
        "top_5": list(json.loads(row.top_k) or [])[:5] if row.top_k is not None else [],
        "error": (row.prediction_error if answered else row.item_error or IMAGE_DELETED) or None,
    }


def _key(batch_id: uuid.UUID, row: Row[Any]) -> ResultKey:
    return ResultKey(batch_id, row.position, row.id, row.model_position)


async def result_page(
    *, session: AsyncSession, batch: Batch, after: ResultKey | None, limit: int, status: str | None = None
) -> tuple[list[dict[str, Any]], int, str | None]:
    """A page of the batch's results: at most ``limit`` rows after ``after`` in the batch's
    order (one per file and model version, one per file without answers), each as RESULT_COLUMNS
    with ``top_5`` as a list of {label, score}; how many rows there are in all (in ``status``
    when given); the next page's cursor, None on the last page."""
    found = list(await session.execute(_results_select(batch.id, after=after, status=status, limit=limit + 1)))
    page = found[:limit]
    item = select(BatchItem).where(BatchItem.batch_id == batch.id).subquery()
    total = select(func.count()).select_from(item).outerjoin(Prediction, Prediction.job_id == item.c.job_id)
    if status is not None:
        total = total.where(_row_status(item) == status)
    count = int(await session.scalar(total) or 0)
    next_cursor = _key(batch.id, page[-1]).encode() if len(found) > limit and page else None
    return [_result(row) for row in page], count, next_cursor


async def results_csv(
    *, session: AsyncSession, batch: Batch, status: str | None = None, chunk_rows: int = CSV_CHUNK_ROWS
) -> AsyncIterator[bytes]:
    """Every result row of the batch (in ``status`` when given) as CSV (``as_csv``), in pieces of
    ``chunk_rows`` rows, each read by its key and formatted in a worker thread. The first piece
    (the header with the first rows) is read before this returns: a database that cannot be
    reached is an error answer then, not a file cut short. Between pieces the session gives its
    connection back to the pool: a slow download holds none. Rows answered while the file is
    read appear as they are when their piece is read."""
    batch_id = batch.id
    rows = list(await session.execute(_results_select(batch_id, after=None, status=status, limit=chunk_rows)))
    await session.close()
    first = await to_thread.run_sync(_csv_piece, rows, True)

    async def pieces(rows: list[Row[Any]]) -> AsyncIterator[bytes]:
        yield first
        while len(rows) == chunk_rows:
            after = _key(batch_id, rows[-1])
            rows = list(await session.execute(_results_select(batch_id, after=after, status=status, limit=chunk_rows)))
            await session.close()
            if rows:
                yield await to_thread.run_sync(_csv_piece, rows, False)

    return pieces(rows)


def _csv_piece(rows: list[Row[Any]], header: bool) -> bytes:
    return as_csv([_result(row) for row in rows], header)


def as_csv(rows: list[dict[str, Any]], header: bool = True) -> bytes:
    """Result rows (``result_page``'s) as CSV lines (``top_5`` as JSON text), UTF-8, after the
    header line when ``header``; the file names and errors people's files gave as text a
    spreadsheet never runs."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(RESULT_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                spreadsheets.cell(row["file_name"]),
                *(row[c] if row[c] is not None else "" for c in RESULT_COLUMNS[1:7]),
                json.dumps(row["top_5"]),
                spreadsheets.cell(row["error"] or ""),
            ]
        )
    return buf.getvalue().encode("utf-8")


def waiting_for(*, models: list[str], availability: dict[str, ModelAvailability], registry: Registry) -> list[str]:
    """The batch's model references (``name@version``, in its order) no live worker serves now
    (``availability``, from the heartbeats), leaving out retired versions: those are not coming
    back, and their images expire instead (``predictions.service.expire_unserved``)."""
    retired = {m.key for m in registry.models if m.channel == "retired"}
    return [ref for ref in models if ref not in retired and (ref not in availability or not availability[ref].workers)]
