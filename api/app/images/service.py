"""Uploads: validation, content-addressed storage, listing and deletion."""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import io
import logging
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from anyio import CapacityLimiter, to_thread
from fastapi import HTTPException, UploadFile
from PIL import Image as PILImage
from PIL import ImageDraw
from sqlalchemy import Table, bindparam, delete, func, insert, select, text, tuple_
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.core.config import Settings
from api.app.core.db import OWNER_KEY_SHARE, utcnow
from api.app.core.errors import DB_ERRORS, OWNER_GONE
from api.app.core.fields import shown_safely, storable
from api.app.core.paging import KeysetPage, keyset_page
from api.app.images.models import BlobDeletion, Image, ImageSource
from api.app.images.storage import LocalBlobStore
from contracts.imaging import ImageInfo, ImageRejected, inspect_image, load_image, trim_heap

log = logging.getLogger(__name__)


async def read_upload(file: UploadFile, settings: Settings) -> bytes:
    """The upload's bytes, or 413 as soon as it is known to be too large."""
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise _too_large(file.size, limit)
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise _too_large(None, limit)
    return data


def upload_filename(file: UploadFile) -> str:
    """The upload's file name as sent (at most 255 characters), its control characters and
    text-direction overrides shown as U+FFFD (``core.fields.shown_safely``); 422 when it holds a
    NUL character."""
    name = file.filename or ""
    if not storable(name):
        raise HTTPException(
            status_code=422, detail="The file name must be Unicode text without NUL characters or lone surrogates."
        )
    return shown_safely(name[:255])


def _too_large(size: int | None, limit: int) -> HTTPException:
    got = f"{size:,} bytes" if size is not None else "larger than that"
    return HTTPException(status_code=413, detail=f"The file is {got}; at most {limit:,} bytes are accepted.")


VIEW_SIZE = 800
"""Longest side of the picture ``render_view`` draws, and of the preview stored for uploads that
cannot be decoded at a reduced scale, in pixels."""


IMAGES = cast(Table, Image.__table__)
INSERT_IMAGE = insert(IMAGES)
BLOB_LOCK = func.pg_advisory_xact_lock(func.hashtextextended(bindparam("b_sha256"), 0))
"""The lock of one content's blob (parameter ``b_sha256``) until the transaction ends. It
serialises an upload and a delete of the same content, so a blob is never removed while a new row
starts to reference it. An upload takes it after its owner's row (``OWNER_KEY_SHARE``)."""
_LOCK_BLOB = select(BLOB_LOCK)
OWNER_THEN_BLOB_LOCK = select(BLOB_LOCK).select_from(OWNER_KEY_SHARE.subquery("owner"))
"""An upload's two locks in one round trip: its owner's row (``OWNER_KEY_SHARE``: the subquery's
row lock comes before the outer select list is computed), then the blob lock. No row when the
owner was deleted, and then no blob lock either."""


_LOCK_BLOBS = text(
    "SELECT count(pg_advisory_xact_lock(hashtextextended(ordered.sha256, 0)))"
    ' FROM (SELECT DISTINCT given.sha256 COLLATE "C" AS sha256'
    " FROM unnest(CAST(:b_sha256s AS text[])) AS given(sha256) ORDER BY 1) AS ordered"
)
"""``BLOB_LOCK`` of each of ``b_sha256s`` in one round trip, taken in byte order (any two holders
of several wait in the same order, Python's ``sorted``)."""


async def _lock_blob(session: AsyncSession, sha256: str) -> None:
    await session.execute(_LOCK_BLOB, {"b_sha256": sha256})


async def _lock_blobs(session: AsyncSession, sha256s: list[str]) -> None:
    await session.execute(_LOCK_BLOBS, {"b_sha256s": sha256s})


async def lock_owner(*, session: AsyncSession, owner_id: int) -> None:
    """Locks the owner's row for the transaction (``OWNER_KEY_SHARE``), before a write that adds
    rows referencing the owner's other rows (a job for a stored image); 401 when they were deleted."""
    if (await session.execute(OWNER_KEY_SHARE, {"b_owner_id": owner_id})).first() is None:
        raise HTTPException(status_code=401, detail=OWNER_GONE)


_DECODE_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, CapacityLimiter]] = (
    weakref.WeakKeyDictionary()
)


def decode_slots(count: int) -> CapacityLimiter:
    """The process's ``count`` (MAX_CONCURRENT_DECODES) decode slots, as the ``limiter`` of
    ``to_thread.run_sync``: a thread decoding an image that may be large holds one, so a burst of
    them takes that many images' memory at once. Waiting for a slot happens in the event loop,
    not in a thread: a burst of views of a slow JPEG held all 40 of the shared pool's threads
    waiting for one slot, and every other request reading or writing a blob waited behind them.
    One limiter per event loop (a CapacityLimiter belongs to the loop it is used in); a process
    serving the API has one."""
    loop = asyncio.get_running_loop()
    limiters = _DECODE_SLOTS.setdefault(loop, {})
    if count not in limiters:
        limiters[count] = CapacityLimiter(count)
    return limiters[count]


def _inspect(data: bytes, settings: Settings) -> tuple[ImageInfo, str]:
    try:
        info = inspect_image(data, max_pixels=settings.max_image_pixels, preview_size=VIEW_SIZE)
    except ImageRejected:
        trim_heap()
        raise
    if info.width * info.height >= TRIM_AFTER_PIXELS:
        trim_heap()
    return info, hashlib.sha256(data).hexdigest()


DrawnT = TypeVar("DrawnT")


def _drawn(draw: Callable[[bytes], DrawnT], data: bytes) -> DrawnT:
    try:
        return draw(data)
    finally:
        if len(data) >= TRIM_AFTER_BYTES:
            trim_heap()


async def drawn_in_slot(draw: Callable[[bytes], DrawnT], data: bytes, *, max_decodes: int) -> DrawnT:
    """``draw(data)`` in a worker thread, in one of the process's decode slots (``decode_slots``),
    which uploads take too: a view or a thumbnail of a large stored JPEG is a full decode at a
    reduced scale (a 7071 x 7071 progressive one takes a second and a few hundred MB), so a burst
    of them must not decode more images at once than a burst of uploads may. Raises what ``draw``
    raises."""
    return await to_thread.run_sync(_drawn, draw, data, limiter=decode_slots(max_decodes))


TRIM_AFTER_BYTES = 1_000_000
"""A picture drawn from at least this many bytes (an upload stored without a preview, not a
preview) hands its freed memory back at once, as large uploads do (``TRIM_AFTER_PIXELS``)."""


TRIM_AFTER_PIXELS = 4_000_000
"""Decodes at least this large hand their freed memory back at once (``trim_heap``, about 0.1 ms):
glibc keeps what a thread freed in that thread's own arena, and the event loop hands each decode to
any of its 40 worker threads, so without it a burst of large uploads leaves the process gigabytes
larger however few decode at once (``test_a_burst_of_large_uploads_leaves_the_process_no_larger``).
Smaller decodes leave little behind, and their memory is reused by the next."""


async def inspect_upload(data: bytes, settings: Settings) -> tuple[ImageInfo, str]:
    """The upload's format and size, and its SHA-256; 413, 415 or 422 when it is no acceptable image.
    At most ``MAX_CONCURRENT_DECODES`` uploads are decoded at once (``decode_slots``)."""
    try:
        limiter = decode_slots(settings.max_concurrent_decodes)
        return await to_thread.run_sync(_inspect, data, settings, limiter=limiter)
    except ImageRejected as exc:
        raise HTTPException(status_code=exc.status, detail=exc.message) from None


async def add_image(
    *,
    session: AsyncSession,
    store: LocalBlobStore,
    owner_id: int,
    data: bytes,
    info: ImageInfo,
    sha256: str,
    filename: str,
    source: ImageSource = "upload",
) -> Image:
    """Stores the blob and inserts the row; the caller commits. Raises 401 when the owner was
    deleted meanwhile (nothing is stored)."""
    owner = await session.execute(OWNER_THEN_BLOB_LOCK, {"b_owner_id": owner_id, "b_sha256": sha256})
    if owner.first() is None:
        raise HTTPException(status_code=401, detail=OWNER_GONE)
    await store.put(sha256, data, preview=info.preview)
    row = new_image_row(owner_id=owner_id, data=data, info=info, sha256=sha256, filename=filename, source=source)
    # A plain INSERT, not the unit of work: it runs on every upload and costs a fraction of a flush.
    await session.execute(INSERT_IMAGE, row)
    return Image(**row)


def new_image_row(
    *, owner_id: int, data: bytes, info: ImageInfo, sha256: str, filename: str, source: ImageSource = "upload"
) -> dict[str, Any]:
    """The ``images`` row of a new upload (every column but ``ground_truth``), for ``INSERT_IMAGE``;
    its blob must be stored under the blob lock (``BLOB_LOCK``) before the row is committed."""
    return {
        "id": uuid.uuid4(),
        "owner_id": owner_id,
        "source": source,
        "sha256": sha256,
        "format": info.format,
        "width": info.width,
        "height": info.height,
        "bytes": len(data),
        "filename": (filename or "")[:255],
        "created_at": utcnow(),
        "brightness": info.stats.brightness if info.stats else None,
        "contrast": info.stats.contrast if info.stats else None,
        "colourfulness": info.stats.colourfulness if info.stats else None,
    }


async def create_image(
    *, session: AsyncSession, store: LocalBlobStore, settings: Settings, owner_id: int, data: bytes, filename: str
) -> Image:
    """Stores an upload (``add_image``) and commits. A transaction that fails once the blob may
    be written forgets the blob (``forget_blob``). Raises what ``inspect_upload`` and
    ``add_image`` raise, and what the database raised."""
    info, sha256 = await inspect_upload(data, settings)
    try:
        image = await add_image(
            session=session, store=store, owner_id=owner_id, data=data, info=info, sha256=sha256, filename=filename
        )
        await session.commit()
    except BaseException:
        await forget_blob(session=session, store=store, sha256=sha256)
        raise
    return image


async def forget_blob(*, session: AsyncSession, store: LocalBlobStore, sha256: str) -> None:
    """After a new upload's transaction failed (its blob perhaps written, its row not committed):
    deletes the blob unless another upload's row has it (``delete_unreferenced_blobs``), shielded
    from the request's cancellation. When that cannot be done now (PostgreSQL unreachable, the
    disk failing), the blob is noted in the store (``LocalBlobStore.note_unsettled``) and
    ``retry_blob_deletions`` does it once they are back. Raises only the request's cancellation: the
    caller raises the upload's own error."""
    try:
        await session.rollback()
        await asyncio.shield(delete_unreferenced_blobs(session=session, store=store, sha256s=[sha256]))
    except Exception as exc:
        try:
            await store.note_unsettled(sha256)
        except OSError:
            log.warning("the blob %s of a failed upload may be left behind", sha256, exc_info=True)
        else:
            log.warning("the blob %s of a failed upload is deleted later, unless referenced: %r", sha256, exc)


async def get_owned_image(*, session: AsyncSession, owner_id: int, image_id: uuid.UUID) -> Image | None:
    return await session.scalar(select(Image).where(Image.id == image_id, Image.owner_id == owner_id))


async def list_images(
    *, session: AsyncSession, owner_id: int, page: KeysetPage, source: ImageSource | None = None
) -> tuple[list[Image], int | None, str | None]:
    """A page of the user's images (``source``: only those uploaded on their own, or only files of
    batches; None: all), newest first; their count when asked; the next page's cursor."""
    where = [Image.owner_id == owner_id] if source is None else [Image.owner_id == owner_id, Image.source == source]
    return await keyset_page(session, Image, *where, page=page)


OWNED_IMAGES_CHUNK = 2_000
"""Uploads a user's deletion deletes per statement, with what cascades from them (jobs,
predictions, verdicts): each statement stays well under the connection's command timeout (10 s),
whatever the history's size."""


async def delete_owned_images(*, session: AsyncSession, owner_id: int) -> int:
    """Deletes every upload of ``owner_id`` and what cascades from them, ``OWNED_IMAGES_CHUNK``
    per statement, in the caller's transaction (which holds the owner's row: no upload of theirs
    begins meanwhile); how many."""
    deleted = 0
    chunk = select(Image.id).where(Image.owner_id == owner_id).limit(OWNED_IMAGES_CHUNK).scalar_subquery()
    while True:
        statement = delete(Image).where(Image.id.in_(chunk)).execution_options(synchronize_session=False)
        result = cast(CursorResult[Any], await session.execute(statement))
        deleted += result.rowcount
        if result.rowcount < OWNED_IMAGES_CHUNK:
            return deleted


async def owned_blobs(*, session: AsyncSession, owner_id: int) -> list[str]:
    """The SHA-256 of every blob the user's uploads reference."""
    return list(await session.scalars(select(Image.sha256).where(Image.owner_id == owner_id).distinct()))


async def queue_blob_deletions(*, session: AsyncSession, sha256s: list[str]) -> None:
    """Queues ``sha256s`` for deletion (``BlobDeletion``) in the caller's transaction, which is
    deleting their last uploads; one statement whatever their number. Already queued ones stay."""
    if sha256s:
        await session.execute(_QUEUE_BLOB_DELETIONS, {"b_sha256s": sha256s})


_QUEUE_BLOB_DELETIONS = text("""
    INSERT INTO blob_deletions (sha256, created_at)
    SELECT sha256, now() FROM unnest(CAST(:b_sha256s AS varchar[])) AS sha256
    ON CONFLICT DO NOTHING
    """)


async def delete_unreferenced_blobs(
    *, session: AsyncSession, store: LocalBlobStore, sha256s: list[str], settled: list[str] | None = None
) -> int:
    """Deletes the blobs no upload references any more (after their rows went); how many were
    there (a sweep or deletion that held their locks before may have deleted some). Takes their
    locks first, then reads which are referenced (an upload of the same content
    that committed meanwhile keeps its blob), in two round trips whatever their number. Their
    queued deletions (``BlobDeletion``) go in the same transaction, with those of ``settled``
    (blobs found referenced: their file stays). Commits, which releases the per-blob locks taken
    here. Raises what the database or the disk raised: a file not deleted stays queued."""
    await _lock_blobs(session, sha256s)
    referenced = set(await session.scalars(select(Image.sha256).where(Image.sha256.in_(sha256s)).distinct()))
    deleted = 0
    for sha256 in sorted(set(sha256s) - referenced):
        deleted += await store.delete(sha256)
    await session.execute(delete(BlobDeletion).where(BlobDeletion.sha256.in_([*sha256s, *(settled or [])])))
    await session.commit()
    return deleted


BLOB_DELETION_RETRY_SECONDS = 300.0
"""How often each API process retries the queued blob deletions (``retry_blob_deletions``), and
how old a queued deletion must be to be retried: one still this young is most likely the
deletion in progress that queued it."""


async def retry_blob_deletions(*, session: AsyncSession, store: LocalBlobStore) -> int:
    """Deletes the files of the queued blob deletions older than ``BLOB_DELETION_RETRY_SECONDS``
    that no upload references again, ``SWEEP_CHUNK`` per transaction (``delete_blobs_in_chunks``),
    and their rows; how many files. What a deletion could not do after its commit (its process
    stopped, the disk or the database failed) is done here, so a deleted account's files do not
    stay on disk. Several processes at once only wait for each other's blob locks. A chunk the
    disk fails is tried again a file at a time: a file that cannot be deleted (its permissions
    changed, say) stays queued, logged, without holding back those queued after it. Raises what
    the database raised; the rest stays queued for the next pass."""
    deleted, failed = 0, 0
    cutoff = utcnow() - timedelta(seconds=BLOB_DELETION_RETRY_SECONDS)
    after: tuple[datetime, str] | None = None
    while True:
        due = select(BlobDeletion.created_at, BlobDeletion.sha256).where(BlobDeletion.created_at < cutoff)
        if after is not None:
            due = due.where(tuple_(BlobDeletion.created_at, BlobDeletion.sha256) > tuple_(*after))
        rows = (
            await session.execute(due.order_by(BlobDeletion.created_at, BlobDeletion.sha256).limit(SWEEP_CHUNK))
        ).all()
        await session.rollback()
        if not rows:
            break
        after = (rows[-1].created_at, rows[-1].sha256)
        chunk = [row.sha256 for row in rows]
        try:
            deleted += await delete_blobs_in_chunks(session=session, store=store, sha256s=chunk, queued=True)
        except OSError:
            await session.rollback()
            for sha256 in chunk:
                try:
                    deleted += await delete_blobs_in_chunks(session=session, store=store, sha256s=[sha256], queued=True)
                except OSError as exc:
                    await session.rollback()
                    failed += 1
                    log.warning("the file of deleted blob %s could not be deleted; it stays queued: %r", sha256, exc)
        if len(rows) < SWEEP_CHUNK:
            break
    deleted += await _settle_failed_uploads(session=session, store=store, cutoff=cutoff)
    if deleted:
        log.info("deleted %d files of deleted uploads left from earlier", deleted)
    if failed:
        log.warning(
            "%d files of deleted uploads could not be deleted; tried again in %.0f s",
            failed,
            BLOB_DELETION_RETRY_SECONDS,
        )
    return deleted


async def _settle_failed_uploads(*, session: AsyncSession, store: LocalBlobStore, cutoff: datetime) -> int:
    """Deletes the blobs of failed uploads noted unsettled before ``cutoff`` (``forget_blob``)
    that no upload references, ``SWEEP_CHUNK`` per transaction, and forgets their notes; how many
    files. A chunk the database or the disk fails stays noted for the next pass (logged)."""
    noted = await store.unsettled(cutoff.timestamp())
    deleted = 0
    for start in range(0, len(noted), SWEEP_CHUNK):
        chunk = noted[start : start + SWEEP_CHUNK]
        try:
            deleted += await delete_blobs_in_chunks(session=session, store=store, sha256s=chunk)
        except OSError as exc:
            await session.rollback()
            log.warning("%d blobs of failed uploads could not be deleted; tried again later: %r", len(chunk), exc)
            continue
        await store.settle(chunk)
    return deleted


@dataclass(frozen=True)
class Sweep:
    """What ``sweep_orphaned_blobs`` found: blobs without an image row (deleted, or that would
    be with ``dry_run``), and temporary files of unfinished writes (removed likewise)."""

    orphaned: int
    unfinished: int


SWEEP_CHUNK = 100
"""Blobs looked up, and deleted under their locks, per transaction: an API process's whole pool
(20 connections) deleting at once holds at most 2,000 of the server's shared lock slots (6,400 by
default), so many deletions at once do not run it out of shared memory."""


async def sweep_orphaned_blobs(
    *, session: AsyncSession, store: LocalBlobStore, older_than_seconds: float, dry_run: bool = False
) -> Sweep:
    """Deletes the blobs (and previews) written more than ``older_than_seconds`` ago that no image
    row references, and the temporary files of writes that never finished. An upload whose
    transaction failed deletes its own blob; this is for what that could not do (PostgreSQL
    unreachable then, or the process killed). Each blob is
    checked again under its lock (``delete_unreferenced_blobs``): an upload of the same content
    in progress keeps it. Reads the whole store: an operator's task, not a request's."""
    blobs, unfinished = await store.written_before(time.time() - older_than_seconds)
    orphaned = await delete_blobs_in_chunks(session=session, store=store, sha256s=blobs, dry_run=dry_run)
    if not dry_run:
        await store.remove(unfinished)
    return Sweep(orphaned=orphaned, unfinished=len(unfinished))


async def delete_blobs_in_chunks(
    *, session: AsyncSession, store: LocalBlobStore, sha256s: list[str], dry_run: bool = False, queued: bool = False
) -> int:
    """Deletes those of ``sha256s`` no image row references, ``SWEEP_CHUNK`` per transaction
    (``delete_unreferenced_blobs`` under their locks); how many (would be, with ``dry_run``).
    Each transaction holds at most SWEEP_CHUNK advisory locks: PostgreSQL's lock table is shared
    by every session of the server (max_locks_per_transaction x max_connections, 6,400 slots by
    default), and one transaction locking a large history's blobs ran it out of shared memory.
    With ``queued`` (they were queued, ``BlobDeletion``), the queued deletions of those found
    referenced go too. Raises what the database or the disk raised; the files not reached stay
    queued, or are the blob sweep's."""
    deleted = 0
    for start in range(0, len(sha256s), SWEEP_CHUNK):
        chunk = sha256s[start : start + SWEEP_CHUNK]
        referenced = set(await session.scalars(select(Image.sha256).where(Image.sha256.in_(chunk)).distinct()))
        candidates = [sha256 for sha256 in chunk if sha256 not in referenced]
        await session.rollback()
        settled = sorted(referenced) if queued else []
        if dry_run:
            deleted += len(candidates)
        elif candidates:
            deleted += await delete_unreferenced_blobs(
                session=session, store=store, sha256s=candidates, settled=settled
            )
        elif settled:
            await session.execute(delete(BlobDeletion).where(BlobDeletion.sha256.in_(settled)))
            await session.commit()
    return deleted


THUMBNAIL_SIZE = 280
"""Longest side of a listed image's thumbnail, in pixels (twice the history page's 140 px)."""


THUMBNAIL_MAX_ASPECT = 4
"""A thumbnail longer than this many times its width or height is padded with white to this
ratio: a 20000 x 1 image's 280 x 1 thumbnail, shown 140 px wide, would be 0 px high."""


def _thumbnail(data: bytes, size: int) -> str:
    img = load_image(data, mode="RGB", draft_size=(size, size))
    img.thumbnail((size, size))
    shortest = -(-max(img.size) // THUMBNAIL_MAX_ASPECT)
    if min(img.size) < shortest:
        padded = PILImage.new("RGB", (max(img.width, shortest), max(img.height, shortest)), "white")
        padded.paste(img, ((padded.width - img.width) // 2, (padded.height - img.height) // 2))
        img = padded
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def thumbnail(
    *, store: LocalBlobStore, settings: Settings, image: Image, size: int = THUMBNAIL_SIZE
) -> str | None:
    """The image shrunk to at most ``size`` pixels a side (upright, transparency on white, padded
    with white to at most ``THUMBNAIL_MAX_ASPECT`` : 1), as a base64 JPEG read from ``store``; None
    when its blob is missing or no longer decodes. Decoded in one of the MAX_CONCURRENT_DECODES
    decode slots uploads take."""
    try:
        data = await store.get_viewable(image.sha256)
        draw = functools.partial(_thumbnail, size=size)
        return await drawn_in_slot(draw, data, max_decodes=settings.max_concurrent_decodes)
    except (OSError, ImageRejected):  # one lost blob must not fail the whole listing
        return None


async def thumbnails(
    *, session: AsyncSession, store: LocalBlobStore, settings: Settings, images: list[Image]
) -> list[str | None]:
    """Each image's ``thumbnail``, in order. ``session`` (the one ``images`` were read with) is
    closed first, its connection back in the pool: the decodes may take seconds, and a few
    listings holding connections all along would leave every other request without one."""
    await session.close()
    return [await thumbnail(store=store, settings=settings, image=image) for image in images]


async def delete_image(*, session: AsyncSession, store: LocalBlobStore, image: Image) -> None:
    """Deletes one upload (its jobs and feedback go with it), and its blob if no other upload has
    it: queued for deletion in the same transaction (``BlobDeletion``), then deleted once that
    commits (``delete_unreferenced_blobs``). The file's deletion failing (the disk, the database)
    leaves it to ``retry_blob_deletions``; the upload is deleted all the same."""
    image_id, sha256 = image.id, image.sha256
    await _lock_blob(session, sha256)
    # A statement, not the ORM's delete: an upload its owner's deletion (or a second request)
    # deleted meanwhile is simply gone, where the ORM warned that no row matched.
    await session.execute(delete(Image).where(Image.id == image_id).execution_options(synchronize_session=False))
    remaining = await session.scalar(select(func.count()).select_from(Image).where(Image.sha256 == sha256))
    if not remaining:
        await queue_blob_deletions(session=session, sha256s=[sha256])
    await session.commit()
    if not remaining:
        try:
            await delete_unreferenced_blobs(session=session, store=store, sha256s=[sha256])
        except (*DB_ERRORS, OSError) as exc:
            await session.rollback()
            log.warning("upload %s deleted; its file is left for the next retry: %r", image_id, exc)


def _annotate(data: bytes, *, lines: list[str]) -> bytes:
    img = load_image(data, mode="RGB", draft_size=(VIEW_SIZE, VIEW_SIZE))
    img.thumbnail((VIEW_SIZE, VIEW_SIZE))
    line_height = 14
    banner = PILImage.new("RGB", (img.width, line_height * max(len(lines), 1) + 8), "white")
    draw = ImageDraw.Draw(banner)
    for i, line in enumerate(lines or ["no prediction yet"]):
        draw.text((4, 4 + i * line_height), line, fill="black")
    out = PILImage.new("RGB", (img.width, img.height + banner.height), "white")
    out.paste(img, (0, 0))
    out.paste(banner, (0, img.height))
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


async def render_view(*, store: LocalBlobStore, settings: Settings, image: Image, lines: list[str]) -> bytes:
    """The image as PNG (at most ``VIEW_SIZE`` px wide or high) with ``lines`` written under it.

    Drawn from the stored preview when the upload has one, so a 50-megapixel PNG is not decoded
    again at full size for each view, in one of the MAX_CONCURRENT_DECODES decode slots uploads
    take. Call it with no database connection checked out: a decode may take seconds."""
    data = await store.get_viewable(image.sha256)
    draw = functools.partial(_annotate, lines=lines)
    try:
        return await drawn_in_slot(draw, data, max_decodes=settings.max_concurrent_decodes)
    except ImageRejected as exc:  # stored before uploads were checked as strictly as now
        raise HTTPException(status_code=exc.status, detail=exc.message) from None
