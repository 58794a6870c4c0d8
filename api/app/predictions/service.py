"""Prediction jobs' life cycle: submission with admission control, queueing, waiting, storage of
results, expiry; and reading them back."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

import asyncpg
from fastapi import HTTPException, UploadFile
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from sqlalchemy import CursorResult, Integer, String, Table, and_, bindparam
from sqlalchemy import cast as sql_cast
from sqlalchemy import exists, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import aliased

from api.app.catalog.service import WorkerDirectory, model_labels, resolve_models, shadow_copies
from api.app.core import metrics
from api.app.core.config import Settings
from api.app.core.db import OWNER_KEY_SHARE
from api.app.core.driver import DriverStatement, driver_connection
from api.app.core.errors import outage_of, violated_constraint
from api.app.core.paging import KeysetPage, count_of, split_page
from api.app.core.request_context import note_stored_job
from api.app.examples import service as examples
from api.app.images import service as images_service
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions import evaluations, queue
from api.app.predictions.models import UNFINISHED, UNFINISHED_JOB, Job, Prediction, ShadowPrediction
from api.app.predictions.schemas import ClassicPrediction, JobPublic, JobsPublic, PredictionPublic
from contracts import keys
from contracts.imaging import ImageInfo
from contracts.messages import JobMessage, PredictionStatus, ResultMessage
from contracts.registry import ModelEntry, Registry

log = logging.getLogger("api.predictions")

# The statements that run once per prediction, built once: building a statement costs more CPU
# than PostgreSQL spends running it, and this is the busiest path of the API. The UPDATEs set the
# columns named in their execution parameters.
_jobs, _predictions = cast(Table, Job.__table__), cast(Table, Prediction.__table__)
_shadows = cast(Table, ShadowPrediction.__table__)
_SHADOW_QUEUE_LIMIT = 1000
"""A shadow version's queue deeper than this gets no more copies: shadows never build a backlog."""
# A job's answer: see ``store_result``. The job's row is locked by a statement of its own inside
# the function, so that the UPDATE of the prediction takes its snapshot once the lock is granted.
# The batch lane queues jobs before it commits them: an answer faster than that commit waits for
# it, then sees the prediction queued. Locked inside the UPDATE, the snapshot predated the commit,
# the prediction still looked pending and the answer was dropped (its batch stalled until the
# job's deadline).
_STORE_ANSWER_CALL = text(
    "SELECT owner_id, answers FROM store_answer(:job_id, :prediction_id, :status, :label, :score, :top_k,"
    " :error, :random_weights, :worker_id, :queue_ms, :preprocess_ms, :inference_ms, :total_ms, :batch_size)"
).bindparams(bindparam("top_k", type_=JSONB))
_STORE_ANSWER = DriverStatement(_STORE_ANSWER_CALL)
_FINISH_JOB = (
    update(_jobs).where(_jobs.c.id == bindparam("b_job_id"), _jobs.c.status.in_(UNFINISHED)).returning(_jobs.c.id)
)
# A batch's jobs have a lane and a cap of their own: they never count against a person's requests.
_IN_FLIGHT = (
    select(func.count())
    .select_from(_jobs)
    .where(
        _jobs.c.owner_id == bindparam("b_owner_id"),
        UNFINISHED_JOB,
        ~_jobs.c.request_id.startswith(keys.BATCH_REQUEST_PREFIX),
    )
)
# The count, after locking the owner's row (``OWNER_KEY_SHARE``) for the transaction, before the
# job's insert locks the image it is for: deleting the user takes the row first too. No row when
# the owner was deleted. Two requests of one user counting at the same moment may both pass: the
# cap is not a hard one. Making it one serialises a user's admissions (a lock per user, held to
# the commit), which a single account sending many requests at once measurably pays for.
_IN_FLIGHT_OF_OWNER = select(_IN_FLIGHT.scalar_subquery()).select_from(OWNER_KEY_SHARE.subquery("owner"))
# The same count, taking the upload's owner and blob locks (``images_service.OWNER_THEN_BLOB_LOCK``)
# in the same round trip: no row when the owner was deleted.
_IN_FLIGHT_LOCKING = select(_IN_FLIGHT.scalar_subquery(), images_service.BLOB_LOCK).select_from(
    OWNER_KEY_SHARE.subquery("owner")
)
_ADMISSION = DriverStatement(_IN_FLIGHT_OF_OWNER)
_ADMISSION_LOCKING_BLOB = DriverStatement(_IN_FLIGHT_LOCKING)
_SET_GROUND_TRUTH = DriverStatement(
    update(images_service.IMAGES)
    .where(images_service.IMAGES.c.id == bindparam("b_image_id"))
    .values(ground_truth=bindparam("b_label"))
)
_JOB_IMAGE_FK = "fk_jobs_image_id_images"
"""The job's image: gone when the image was deleted after the request read it."""
_JOB_COLUMNS = ("id", "owner_id", "image_id", "status", "request_id", "deadline_at", "finished_at", "created_at")
# Every column of a new prediction row: the rows of one INSERT must name the same columns.
_NEW_PREDICTION: dict[str, Any] = {
    "status": PredictionStatus.queued.value,
    "label": None,
    "score": None,
    "top_k": [],
    "cached": False,
    "random_weights": False,
    "error": None,
    "worker_id": None,
    "queue_ms": None,
    "preprocess_ms": None,
    "inference_ms": None,
    "total_ms": None,
    "batch_size": None,
    "finished_at": None,
}
_JOB_PREDICTIONS = (
    select(Prediction)
    .where(Prediction.job_id == bindparam("b_job_id"))
    .order_by(Prediction.position)
    # Rows this session changed with plain UPDATEs must not be served from its identity map.
    .execution_options(populate_existing=True)
)
_ANSWERS = TypeAdapter(list[PredictionPublic])
_EXPIRED_KEY = (Prediction.model_name, Prediction.model_version)
"""What an UPDATE expiring or failing predictions of several versions returns per row, for
``metrics.count_expired`` and ``metrics.count_failed``."""


def _unavailable(detail: str, settings: Settings) -> HTTPException:
    return HTTPException(status_code=503, detail=detail, headers={"Retry-After": str(settings.retry_after_seconds)})


def _rejected(entries: list[ModelEntry]) -> None:
    for entry in entries:
        metrics.JOBS.labels(entry.name, str(entry.version), "rejected").inc()


async def check_queues(
    *, redis: Redis, settings: Settings, entries: list[ModelEntry], owner_id: int, sha256: str
) -> dict[str, ResultMessage]:
    """The first half of admission, before any database work: 503 when the queue of a version
    that must answer is full. Returns the cached answers (``RESULT_CACHE_TTL_SECONDS``), by model
    key; those versions are not queued."""
    cached: dict[str, ResultMessage] = {}
    for entry in entries:
        hit = None
        if settings.result_cache_ttl_seconds > 0:
            hit = await queue.cached_result(redis, owner_id, sha256, entry.name, entry.version)
            metrics.CACHE.labels("hit" if hit is not None else "miss").inc()
        if hit is not None:
            cached[entry.key] = hit
            continue
        if not await queue.has_room(redis, entry.name, entry.version, settings.max_queue_depth):
            _rejected(entries)
            raise _unavailable(f"The queue of {entry.key} is full; retry shortly.", settings)
    return cached


async def admit(
    *,
    connection: asyncpg.Connection,
    settings: Settings,
    entries: list[ModelEntry],
    owner_id: int,
    sha256: str,
    lock_blob: bool = False,
) -> None:
    """The second half of admission, the first statement of the transaction storing the job: 429
    (with ``Retry-After``) when the user has ``MAX_JOBS_IN_FLIGHT_PER_USER`` predictions in flight
    already. Locks the owner's row for the rest of
    ``connection``'s transaction (401 when the owner was deleted meanwhile), then with
    ``lock_blob`` the blob lock of ``sha256`` (a new upload's, before its blob is written), both in
    the round trip of the count."""
    if lock_blob:
        row = await _ADMISSION_LOCKING_BLOB.fetchrow(connection, {"b_owner_id": owner_id, "b_sha256": sha256})
    else:
        row = await _ADMISSION.fetchrow(connection, {"b_owner_id": owner_id})
    if row is None:
        raise HTTPException(status_code=401, detail=images_service.OWNER_GONE)
    in_flight = row[0] or 0  # not counting this request
    if in_flight >= settings.max_jobs_in_flight_per_user:
        _rejected(entries)
        raise HTTPException(
            status_code=429,
            detail=f"You have {in_flight} predictions in flight; wait for some to finish.",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )


@dataclass(frozen=True)
class Upload:
    """An upload that passed validation and is not stored yet."""

    data: bytes
    info: ImageInfo
    sha256: str
    filename: str


async def _admit_and_queue(
    *,
    engine: AsyncEngine,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    settings: Settings,
    entries: list[ModelEntry],
    owner_id: int,
    request_id: str,
    deadline_seconds: float,
    image: Image | Upload,
    shadows: dict[str, list[ModelEntry]] | None = None,
    ground_truth: GroundTruth | None = None,
) -> tuple[Image, Job]:
    """Admission first, then the upload (when new), its ground truth and its job are committed
    together and the job queued: a rejected request stores nothing. A new upload's row goes in
    with the job's (one statement, ``insert_job``).

    The transaction runs on one of ``engine``'s connections through its driver (``core.driver``):
    it is the path of every prediction. A blob written for a transaction that then failed is
    deleted again (``images.service.forget_blob``). ``session`` (holding no connection meanwhile) is used for
    what is rare: that, failing the job when Redis refuses it, and shadow copies."""
    upload = image if isinstance(image, Upload) else None
    # Redis first: no pooled connection and no lock is held meanwhile.
    cached = await check_queues(redis=redis, settings=settings, entries=entries, owner_id=owner_id, sha256=image.sha256)
    blob_written = False
    try:
        async with driver_connection(engine) as connection, connection.transaction():
            await admit(
                connection=connection,
                settings=settings,
                entries=entries,
                owner_id=owner_id,
                sha256=image.sha256,
                lock_blob=upload is not None,
            )
            new_image: dict[str, Any] | None = None
            if upload is not None:
                # Under the blob lock admission took: a delete of the same content waits for the commit.
                blob_written = True
                await store.put(upload.sha256, upload.data, preview=upload.info.preview)
                new_image = images_service.new_image_row(
                    owner_id=owner_id,
                    data=upload.data,
                    info=upload.info,
                    sha256=upload.sha256,
                    filename=upload.filename,
                )
                image = Image(**new_image)
            assert isinstance(image, Image)
            job, predictions = await insert_job(
                connection=connection,
                image=image,
                new_image=new_image,
                entries=entries,
                cached=cached,
                owner_id=owner_id,
                deadline_seconds=deadline_seconds,
                request_id=request_id,
            )
            if ground_truth is not None:
                await _store_ground_truth(
                    connection=connection, image=image, ground_truth=ground_truth, owner_id=owner_id, settings=settings
                )
    except BaseException:
        if blob_written and upload is not None:
            await images_service.forget_blob(session=session, store=store, sha256=upload.sha256)
        raise
    # Committed: it goes on (the reconciler queues it if this request is cut before queue_job does).
    note_stored_job(job.id)
    await queue_job(
        session=session,
        redis=redis,
        store=store,
        image=image,
        job=job,
        predictions=predictions,
        data=upload.data if upload is not None else None,
        shadows=shadows or {},
    )
    return image, job


@dataclass(frozen=True)
class GroundTruth:
    """The uploader's own label, and the chosen models that have it among their labels."""

    label: str
    models: list[str]


async def ground_truth_for(*, redis: Redis, entries: list[ModelEntry], label: str | None) -> GroundTruth | None:
    """``label`` checked against the chosen models' labels: 422 when none of them has it, 503
    when their labels are not known yet (no worker serving them has started); None without one."""
    if label is None:
        return None
    known = {entry.key: await model_labels(redis, entry) for entry in entries}
    # Sorted: each name's labelled example is upserted in this order, and two requests labelling
    # the same content for the same models must lock those rows in the same order.
    having = sorted({e.name for e in entries if label in (known[e.key] or [])})
    if having:
        return GroundTruth(label=label, models=having)
    if all(labels is None for labels in known.values()):
        raise HTTPException(
            status_code=503,
            detail="The chosen models' labels are not known until a worker serving them has started; retry shortly.",
            headers={"Retry-After": "5"},
        )
    chosen = ", ".join(e.key for e in entries)
    raise HTTPException(
        status_code=422, detail=f"ground_truth {label!r} is not a label of the chosen models ({chosen})."
    )


async def _store_ground_truth(
    *, connection: asyncpg.Connection, image: Image, ground_truth: GroundTruth, owner_id: int, settings: Settings
) -> None:
    await _SET_GROUND_TRUTH.execute(connection, {"b_image_id": image.id, "b_label": ground_truth.label})
    image.ground_truth = ground_truth.label
    for name in ground_truth.models:
        labelled = examples.example(
            model_name=name,
            sha256=image.sha256,
            label=ground_truth.label,
            source="ground_truth",
            owner_id=owner_id,
            test_share=settings.feedback_test_share,
            image_id=image.id,
        )
        await examples.RECORD_ON_DRIVER.execute(connection, labelled)


async def _route(
    *,
    redis: Redis,
    workers: WorkerDirectory,
    registry: Registry,
    settings: Settings,
    owner_id: int,
    refs: list[str],
    ground_truth: str | None,
) -> tuple[list[ModelEntry], dict[str, list[ModelEntry]], GroundTruth | None]:
    """The versions that answer this request, the shadow copies it sends, and its ground truth
    checked against them (raising as ``resolve_models`` and ``ground_truth_for`` do)."""
    availability = await workers.availability()
    entries = resolve_models(refs, registry=registry, availability=availability, settings=settings, user_id=owner_id)
    shadows = shadow_copies(
        entries,
        registry=registry,
        availability=availability,
        sample_rate=settings.shadow_sample_rate,
        benchmark_mode=settings.benchmark_mode,
    )
    return entries, shadows, await ground_truth_for(redis=redis, entries=entries, label=ground_truth)


async def submit(
    *,
    engine: AsyncEngine,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    workers: WorkerDirectory,
    registry: Registry,
    settings: Settings,
    owner_id: int,
    image_id: uuid.UUID,
    refs: list[str],
    request_id: str,
    ground_truth: str | None = None,
) -> Job:
    """Queues a prediction of one of the user's stored images by the models ``refs`` name (the
    default model when empty); the job is answered later (``JOB_DEADLINE_SECONDS``). A
    ``ground_truth`` (the uploader's own label) is kept with the image and becomes a labelled
    example of each chosen model that has it.

    Raises 404 (not the user's image, or deleted meanwhile), 422 (unknown or broken model, a
    ground truth none of them has), 429 (too many in flight), 503 (model not served yet, queue
    full or Redis down); a rejected request stores nothing.
    """
    image = await images_service.get_owned_image(session=session, owner_id=owner_id, image_id=image_id)
    # Its connection back before admission takes one of its own.
    await session.close()
    if image is None:
        raise HTTPException(status_code=404, detail="Image not found")
    entries, shadows, truth = await _route(
        redis=redis,
        workers=workers,
        registry=registry,
        settings=settings,
        owner_id=owner_id,
        refs=refs,
        ground_truth=ground_truth,
    )
    try:
        _, job = await _admit_and_queue(
            engine=engine,
            session=session,
            redis=redis,
            store=store,
            settings=settings,
            entries=entries,
            owner_id=owner_id,
            request_id=request_id,
            deadline_seconds=settings.job_deadline_seconds,
            image=image,
            shadows=shadows,
            ground_truth=truth,
        )
    except asyncpg.ForeignKeyViolationError as exc:
        if violated_constraint(exc) != _JOB_IMAGE_FK:
            raise
        raise HTTPException(status_code=404, detail="Image not found: it was deleted meanwhile.") from None
    return job


async def predict_and_wait(
    *,
    engine: AsyncEngine,
    session: AsyncSession,
    reader: AsyncSession,
    redis: Redis,
    blocking_redis: Redis,
    store: LocalBlobStore,
    workers: WorkerDirectory,
    registry: Registry,
    settings: Settings,
    owner_id: int,
    file: UploadFile,
    refs: list[str],
    request_id: str,
    ground_truth: str | None = None,
) -> ClassicPrediction:
    """Stores an upload, queues its prediction and waits for every answer, up to
    ``PREDICT_DEADLINE_SECONDS``.

    The models are checked before the body is read, and nothing is stored before admission.
    Raises as ``submit`` does (``ground_truth`` too), plus 413/415/422 for the upload and 504
    when the deadline passes (the job then goes on and can be read by its id); a PostgreSQL outage
    while waiting does not end the wait, but one (or a Redis outage) that keeps the answer from
    being read is a 503 naming the job's id, as the 504 does, and so is the 503 of a server
    stopping once the job is committed (``note_stored_job``).
    """
    entries, shadows, truth = await _route(
        redis=redis,
        workers=workers,
        registry=registry,
        settings=settings,
        owner_id=owner_id,
        refs=refs,
        ground_truth=ground_truth,
    )
    filename = images_service.upload_filename(file)
    data = await images_service.read_upload(file, settings)
    info, sha256 = await images_service.inspect_upload(data, settings)
    image, job = await _admit_and_queue(
        engine=engine,
        session=session,
        redis=redis,
        store=store,
        settings=settings,
        entries=entries,
        owner_id=owner_id,
        request_id=request_id,
        deadline_seconds=settings.predict_deadline_seconds,
        image=Upload(data=data, info=info, sha256=sha256, filename=filename),
        shadows=shadows,
        ground_truth=truth,
    )
    answers: list[PredictionPublic] | None = None
    try:
        if job.status in UNFINISHED:
            # Hand the database connection back while waiting: waiters must not exhaust the pool.
            await session.close()
            done = await _wait_while_the_job_exists(
                reader=reader, blocking_redis=blocking_redis, job_id=job.id, seconds=settings.predict_deadline_seconds
            )
            answers = answers_from_payload(done)
        if answers is None:
            answers = [PredictionPublic.from_row(p) for p in await job_predictions(session=reader, job_id=job.id)]
    except Exception as exc:
        # The job is stored and goes on: a client told only to retry would make a duplicate and
        # could never fetch this one's answer, so the 503 names the job, as the 504 does.
        if (dependency := outage_of(exc)) is None:
            raise
        name = "The database" if dependency == "postgresql" else "A service the portal needs (Redis)"
        raise _unavailable(
            f"{name} is unavailable; the prediction was stored and goes on:"
            f" GET /v1/predictions/{job.id} gives its answer.",
            settings,
        ) from exc
    return ClassicPrediction.from_answers(job_id=job.id, file_name=image.file_name, answers=answers)


GONE_CHECK_SECONDS = 2.0
"""How often a request waiting for its answers checks that its job still exists (the image or the
user may be deleted meanwhile, and the job with them)."""


async def _wait_while_the_job_exists(
    *, reader: AsyncSession, blocking_redis: Redis, job_id: uuid.UUID, seconds: float
) -> bytes:
    """The job's notification once it is finished; 404 soon after the job is deleted, 504 when
    ``seconds`` pass first. PostgreSQL out of reach does not end the wait: the answer comes
    through Redis, and the job is checked again once PostgreSQL is back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (remaining := deadline - loop.time()) > 0:
        done = await queue.wait_done(blocking_redis, str(job_id), min(remaining, GONE_CHECK_SECONDS))
        if done is not None:
            return done
        try:
            exists = await reader.scalar(select(Job.id).where(Job.id == job_id)) is not None
        except Exception as exc:
            if outage_of(exc) != "postgresql":
                raise
            exists = True  # unknown during the outage: the job was stored, so wait on
        finally:
            await reader.close()  # no connection held between checks
        if not exists:
            raise HTTPException(
                status_code=404, detail="The prediction was deleted, with its image or its owner, before it finished."
            )
    raise HTTPException(
        status_code=504,
        detail=f"No result within {seconds:g} s; GET /v1/predictions/{job_id} gives the job's final state.",
    )


def _bound(table: Table, columns: Iterable[str], prefix: str) -> dict[str, Any]:
    """``table``'s ``columns`` as parameters named ``prefix`` + column."""
    return {column: bindparam(f"{prefix}{column}", type_=table.c[column].type) for column in columns}


@functools.cache
def _insert_job_statement(
    prediction_columns: tuple[str, ...], models: int, image_columns: tuple[str, ...]
) -> DriverStatement:
    """The statement storing a job (parameters ``job_*``), its ``models`` predictions (``p0_*``,
    ``p1_*``...) and, with ``image_columns``, the new upload's image (``image_*``), as
    data-modifying CTEs; built and compiled once per shape."""
    statement = insert(_jobs).values(_bound(_jobs, _JOB_COLUMNS, "job_"))
    for position in range(models):
        new_prediction = insert(_predictions).values(_bound(_predictions, prediction_columns, f"p{position}_"))
        statement = statement.add_cte(new_prediction.cte(f"new_prediction_{position}"))
    if image_columns:
        new_image = images_service.INSERT_IMAGE.values(_bound(images_service.IMAGES, image_columns, "image_"))
        statement = statement.add_cte(new_image.cte("new_image"))
    return DriverStatement(statement)


async def insert_job(
    *,
    connection: asyncpg.Connection,
    image: Image,
    new_image: dict[str, Any] | None,
    entries: list[ModelEntry],
    cached: dict[str, ResultMessage],
    owner_id: int,
    deadline_seconds: float,
    request_id: str,
) -> tuple[Job, list[dict[str, Any]]]:
    """Inserts the job and its predictions (the cached answers done already) in one statement,
    with ``new_image``'s row first when the image is a new upload; does not commit. Returns the
    job and its predictions' rows.

    ``cached``: what ``admit`` returned. One statement (data-modifying CTEs; the foreign keys are
    checked at its end) because this runs on every prediction: each round trip to PostgreSQL costs
    the API more CPU than PostgreSQL spends on the insert (``python -m bench.profile``)."""
    now = datetime.now(UTC)
    job_row: dict[str, Any] = {
        "id": uuid.uuid4(),
        "owner_id": owner_id,
        "image_id": image.id,
        "status": PredictionStatus.queued.value,
        "request_id": request_id,
        "deadline_at": now + timedelta(seconds=deadline_seconds),
        "finished_at": None,
        "created_at": now,
    }
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    for position, entry in enumerate(entries):
        row = {**_NEW_PREDICTION, "id": uuid.uuid4(), "job_id": job_row["id"], "position": position}
        row.update(model_name=entry.name, model_version=entry.version, created_at=now)
        if (hit := cached.get(entry.key)) is not None:
            row.update(_result_values(hit, now), cached=True)
        else:
            pending.append(row)
        rows.append(row)
    if not pending:
        job_row.update(status=PredictionStatus.done.value, finished_at=now)
    params = {f"job_{column}": value for column, value in job_row.items()}
    for position, row in enumerate(rows):
        params.update({f"p{position}_{column}": value for column, value in row.items()})
    for column, value in (new_image or {}).items():
        params[f"image_{column}"] = value
    statement = _insert_job_statement(tuple(rows[0]), len(rows), tuple(new_image or ()))
    await statement.execute(connection, params)
    return Job(**job_row), rows


async def queue_job(
    *,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    image: Image,
    job: Job,
    predictions: list[dict[str, Any]],
    data: bytes | None = None,
    shadows: dict[str, list[ModelEntry]] | None = None,
) -> None:
    """Queues those of the committed job's ``predictions`` (rows) that were not answered from the
    cache; fails the job when Redis refuses them.

    ``data``: the image's bytes when the caller holds them (saves reading the blob back).
    ``shadows``: by entry key, the shadow versions that get a copy (``shadow_copies``); a copy is
    best effort and never fails or delays the job.
    """
    pending = [row for row in predictions if row["status"] == PredictionStatus.queued.value]
    if pending:
        if data is None:
            data = await store.get(image.sha256)
        messages = [job_message(job, Prediction(**row), image.sha256, data) for row in pending]
        try:
            await queue.enqueue(redis, messages)
        except Exception:
            await fail_unfinished(session=session, job_id=job.id, reason="the job queue was unavailable")
            raise
    if shadows:
        primaries = {f"{p['model_name']}@{p['model_version']}": p["id"] for p in predictions}
        copies = [(primaries[key], m) for key, entries_ in shadows.items() if key in primaries for m in entries_]
        if copies:
            if data is None:
                data = await store.get(image.sha256)
            await _queue_shadows(session=session, redis=redis, job=job, sha256=image.sha256, data=data, copies=copies)


async def _queue_shadows(
    *,
    session: AsyncSession,
    redis: Redis,
    job: Job,
    sha256: str,
    data: bytes,
    copies: list[tuple[uuid.UUID, ModelEntry]],
) -> None:
    """Stores and queues a shadow copy per (prediction, shadow version), skipping a version whose
    queue is full; an error is logged, not raised: the user's job does not depend on its shadows."""
    try:
        rows: list[dict[str, Any]] = []
        for primary_id, entry in copies:
            if await queue.depth(redis, entry.name, entry.version) >= _SHADOW_QUEUE_LIMIT:
                continue
            rows.append(
                {
                    "id": uuid.uuid4(),
                    "job_id": job.id,
                    "shadow_of": primary_id,
                    "model_name": entry.name,
                    "model_version": entry.version,
                    "status": PredictionStatus.queued.value,
                    "top_k": [],
                    "created_at": job.created_at,
                }
            )
        if not rows:
            return
        await session.execute(insert(_shadows), rows)
        await session.commit()
        messages = [
            JobMessage(
                job_id=str(job.id),
                prediction_id=str(r["id"]),
                model=r["model_name"],
                version=r["model_version"],
                sha256=sha256,
                request_id=job.request_id,
                deadline=job.deadline_at.timestamp(),
                shadow_of=str(r["shadow_of"]),
                image=data,
            )
            for r in rows
        ]
        await queue.enqueue(redis, messages)
    except Exception:
        log.exception("shadow copies of job %s not queued", job.id)


BATCH_MESSAGE_SLACK = timedelta(days=7)
"""How far past its job's deadline a batch job's message tells a worker to compute it. The lane keeps
a queued batch job's deadline ahead while no live worker serves its model version
(``batches.lane.top_up``), so the job outlives an outage; its message, already in the queue, must
too, or the worker back from the outage would answer it ``expired``. Nobody waits on a batch job,
so a worker that computes one after the API gave up on it wastes one inference at most."""


def job_message(job: Job, prediction: Prediction, sha256: str, data: bytes) -> JobMessage:
    """The message asking ``prediction``'s model version for its answer on ``job``'s image
    (``data``, its stored bytes; ``sha256``, their hex digest). Its deadline is the job's, or for a
    batch job ``BATCH_MESSAGE_SLACK`` later."""
    deadline = job.deadline_at
    if job.request_id.startswith(keys.BATCH_REQUEST_PREFIX):
        deadline += BATCH_MESSAGE_SLACK
    return JobMessage(
        job_id=str(job.id),
        prediction_id=str(prediction.id),
        model=prediction.model_name,
        version=prediction.model_version,
        sha256=sha256,
        request_id=job.request_id,
        deadline=deadline.timestamp(),
        image=data,
    )


def _result_values(result: ResultMessage, now: datetime) -> dict[str, Any]:
    """A worker's answer as the columns of its prediction row."""
    label, score = queue.top1(result.top_k)
    t = result.timings
    return {
        "status": result.status.value,
        "top_k": [k.model_dump() for k in result.top_k],
        "label": label,
        "score": score,
        "error": result.error,
        "random_weights": result.random_weights,
        "worker_id": result.worker_id,
        "queue_ms": t.queue_ms,
        "preprocess_ms": t.preprocess_ms,
        "inference_ms": t.inference_ms,
        "total_ms": t.total_ms,
        "batch_size": t.batch_size,
        "finished_at": now,
    }


def _job_status(statuses: list[str]) -> str:
    if any(s in UNFINISHED for s in statuses):
        return (
            PredictionStatus.running.value
            if PredictionStatus.running.value in statuses
            else PredictionStatus.queued.value
        )
    for status in (PredictionStatus.done, PredictionStatus.failed, PredictionStatus.cancelled):
        if status.value in statuses:
            return status.value
    return PredictionStatus.expired.value


async def _complete_job(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> list[Prediction] | None:
    """Gives the job its final status once every prediction has one; the job's predictions when
    this call did it, else None.

    The caller holds the job's row lock, so the predictions read here include every answer
    committed before it.
    """
    predictions = await job_predictions(session=session, job_id=job_id)
    status = _job_status([p.status for p in predictions])
    if status in UNFINISHED:
        return None
    finished = await session.scalar(_FINISH_JOB, {"b_job_id": job_id, "status": status, "finished_at": now})
    return predictions if finished is not None else None


class StoredResult(NamedTuple):
    owner_id: int | None
    """The job's owner when the answer was stored; None when it changed nothing."""
    answers: bytes | None
    """When the answer completed its job, the job's answers for the waiting request (``answers_payload``)."""


async def store_result(*, session: AsyncSession, result: ResultMessage) -> StoredResult:
    """Stores a worker's answer once.

    A duplicate answer (a job delivered twice after a worker died) finds the prediction already
    final and changes nothing; so does an answer whose job (with its image) was deleted. The job's
    row is locked first, so answers for the same job from two API processes take turns and the
    second sees the first when it decides the job is complete.

    A job's answer is stored by the database function ``store_answer`` (migration a4d1c7e93b26)
    in one round trip: the lock, the answer, the job's completion and, when it completed the job,
    the job's answers as JSON. In a transactional ``session`` it commits; in an autocommit one
    (``make_read_sessionmaker``) it is the whole exchange with PostgreSQL.
    """
    now = datetime.now(UTC)
    if result.shadow_of:
        await _store_shadow_answer(session, result, now)
        return StoredResult(None, None)
    if result.evaluation:
        await evaluations.store_answer(session=session, result=result)
        return StoredResult(None, None)
    row = (await session.execute(_STORE_ANSWER_CALL, _answer_parameters(result, now))).one_or_none()
    await session.commit()
    return _stored(row)


async def store_answer(*, engine: AsyncEngine, result: ResultMessage) -> StoredResult:
    """``store_result`` for the answer of a user's job (neither a shadow copy nor an evaluation),
    as the result collector stores every one: the same statement, sent to the driver directly
    (``core.driver``) on one of ``engine``'s connections, outside any transaction."""
    assert not result.shadow_of and not result.evaluation
    async with driver_connection(engine) as connection:
        row = await _STORE_ANSWER.fetchrow(connection, _answer_parameters(result, datetime.now(UTC)))
    return _stored(row)


def _answer_parameters(result: ResultMessage, now: datetime) -> dict[str, Any]:
    # store_answer sets finished_at itself, from the transaction's clock.
    answer = {k: v for k, v in _result_values(result, now).items() if k != "finished_at"}
    return {"job_id": uuid.UUID(result.job_id), "prediction_id": uuid.UUID(result.prediction_id), **answer}


def _stored(row: Sequence[Any] | None) -> StoredResult:
    """The StoredResult of store_answer's row (owner_id, answers), from SQLAlchemy or asyncpg."""
    if row is None:
        return StoredResult(None, None)
    owner_id, answers = row[0], row[1]
    return StoredResult(owner_id, answers.encode() if answers is not None else None)


async def _store_shadow_answer(session: AsyncSession, result: ResultMessage, now: datetime) -> None:
    values = _result_values(result, now)
    for column in ("random_weights", "preprocess_ms", "batch_size"):
        values.pop(column)
    await session.execute(
        update(ShadowPrediction)
        .where(ShadowPrediction.id == uuid.UUID(result.prediction_id), ShadowPrediction.status.in_(UNFINISHED))
        .values(**values)
    )
    await session.commit()


async def shadow_agreement(
    *, session: AsyncSession, since: datetime, name: str | None = None, mirrored_version: int | None = None
) -> list[tuple[str, int, int, int]]:
    """Per shadow version with answers since ``since`` (only model ``name``'s, only copies of
    ``mirrored_version``'s answers, when given): (model, version, copies answered whose mirrored
    answer is done, those whose top-1 label equals the mirrored one)."""
    primary = aliased(Prediction)
    query = (
        select(
            ShadowPrediction.model_name,
            ShadowPrediction.model_version,
            func.count(),
            func.sum(sql_cast(ShadowPrediction.label == primary.label, Integer)),
        )
        .join(primary, and_(primary.id == ShadowPrediction.shadow_of, primary.status == PredictionStatus.done.value))
        .where(ShadowPrediction.status == PredictionStatus.done.value, ShadowPrediction.created_at >= since)
        .group_by(ShadowPrediction.model_name, ShadowPrediction.model_version)
    )
    if name is not None:
        query = query.where(ShadowPrediction.model_name == name)
    if mirrored_version is not None:
        query = query.where(primary.model_version == mirrored_version)
    rows = await session.execute(query)
    return [(model, version, int(count), int(agreeing or 0)) for model, version, count, agreeing in rows]


def answers_payload(predictions: list[Prediction]) -> bytes:
    """A finished job's answers, as the notification that wakes its waiting request carries them:
    the request answers from it instead of reading the job back."""
    return _ANSWERS.dump_json([PredictionPublic.from_row(p) for p in predictions])


def answers_from_payload(payload: bytes) -> list[PredictionPublic] | None:
    """The answers a notification carries; None for a bare wake-up, which API processes of
    earlier releases send (the answers are then read from PostgreSQL)."""
    try:
        return _ANSWERS.validate_json(payload)
    except ValidationError:
        return None


async def fail_unfinished(*, session: AsyncSession, job_id: uuid.UUID, reason: str) -> None:
    """Fails the job ``job_id`` and its predictions not yet final with ``reason`` (their
    ``error``), counted in ``portal_jobs_total``; commits."""
    failed = await session.execute(
        update(Prediction)
        .where(Prediction.job_id == job_id, Prediction.status.in_(UNFINISHED))
        .values(status=PredictionStatus.failed.value, error=reason, finished_at=datetime.now(UTC))
        .returning(*_EXPIRED_KEY)
    )
    counted = [(name, version) for name, version in failed]
    await session.execute(
        update(Job).where(Job.id == job_id).values(status=PredictionStatus.failed.value, finished_at=datetime.now(UTC))
    )
    await session.commit()
    metrics.count_failed(counted)


async def expire_overdue(*, session: AsyncSession, grace_seconds: float) -> dict[uuid.UUID, bytes]:
    """Marks predictions whose job deadline passed as expired (counted in ``portal_jobs_total``,
    shadow copies not); returns the jobs this finished, each with its answers
    (``answers_payload``)."""
    now = datetime.now(UTC)
    overdue = list(
        await session.scalars(
            select(Job.id).where(UNFINISHED_JOB, Job.deadline_at < now - timedelta(seconds=grace_seconds))
        )
    )
    # Shadow copies whose job's deadline passed (a copy lost with Redis's data is never answered).
    await session.execute(
        update(ShadowPrediction)
        .where(
            ShadowPrediction.status.in_(UNFINISHED),
            ShadowPrediction.job_id == Job.id,
            Job.deadline_at < now - timedelta(seconds=grace_seconds),
        )
        .values(
            status=PredictionStatus.expired.value, error="deadline passed before a worker answered", finished_at=now
        )
    )
    await session.commit()
    finished: dict[uuid.UUID, bytes] = {}
    for job_id in overdue:
        locked = await session.scalar(select(Job.id).where(Job.id == job_id).with_for_update(skip_locked=True))
        if locked is None:
            continue
        expired = await session.execute(
            update(Prediction)
            .where(Prediction.job_id == job_id, Prediction.status.in_(UNFINISHED))
            .values(
                status=PredictionStatus.expired.value, error="deadline passed before a worker answered", finished_at=now
            )
            .returning(*_EXPIRED_KEY)
        )
        counted = [(name, version) for name, version in expired]
        if (predictions := await _complete_job(session, job_id, now)) is not None:
            finished[job_id] = answers_payload(predictions)
        await session.commit()
        metrics.count_expired(counted)
    return finished


class Unserved(NamedTuple):
    """A version whose queued answers can no longer come (``unserved_versions``)."""

    reason: str
    """Why, for its predictions' error."""
    retired: bool
    """Retired rather than disabled: a disabled version may be enabled again, so a batch's images
    for it wait (``expire_unserved``)."""


def unserved_versions(registry: Registry, served: Iterable[str]) -> dict[tuple[str, int], Unserved]:
    """The versions whose queued answers can no longer come: retired or disabled in ``registry``
    and loaded by no live worker (``served``, keys like ``sketch@2``: a worker lets a version go
    between batches, after answering what it holds)."""
    loaded = set(served)
    return {
        (entry.name, entry.version): Unserved(
            f"{entry.key} was {'retired' if entry.channel == 'retired' else 'disabled'} before a worker "
            "answered it; send the image again for the version serving now",
            retired=entry.channel == "retired",
        )
        for entry in registry.models
        if (entry.channel == "retired" or not entry.enabled) and entry.key not in loaded
    }


async def expire_unserved(
    *, session: AsyncSession, versions: dict[tuple[str, int], Unserved]
) -> dict[uuid.UUID, bytes]:
    """Marks the unfinished predictions (and shadow copies) of ``versions`` (``unserved_versions``)
    expired with their reason, at once rather than at their job's deadline: no worker reads their
    queues any more. A batch's predictions are expired only for a retired version, the queued ones
    and those the lane has not queued yet (``pending``: the lane queues only versions a worker
    serves, so they would keep their batch running for good); for a disabled one they wait, as the
    batch's ``waiting_for`` says, until it is enabled again or the batch is cancelled. A job's
    other predictions are left as they are. Each prediction expired is counted in
    ``portal_jobs_total`` (shadow copies are not). Returns the jobs this finished, each with its answers
    (``answers_payload``), for the requests waiting on them."""
    if not versions:
        return {}
    now = datetime.now(UTC)
    finished: dict[uuid.UUID, bytes] = {}
    for (name, version), (reason, retired) in versions.items():
        if retired:
            await _expire_pending(session, name=name, version=version, reason=reason, now=now)
        of_version = (
            Prediction.model_name == name,
            Prediction.model_version == version,
            Prediction.status.in_(UNFINISHED),
        )
        # The status as the literal predicate of ix_shadow_predictions_unfinished, so that the
        # partial index of unfinished copies is read, not every copy the version ever answered.
        shadows = await session.execute(
            update(ShadowPrediction)
            .where(UNFINISHED_JOB, ShadowPrediction.model_name == name, ShadowPrediction.model_version == version)
            .values(status=PredictionStatus.expired.value, error=reason, finished_at=now)
        )
        if cast(CursorResult[Any], shadows).rowcount:
            await session.commit()
        jobs = select(Prediction.job_id).where(*of_version).distinct()
        if not retired:
            jobs = jobs.join(Job, Job.id == Prediction.job_id).where(
                ~Job.request_id.startswith(keys.BATCH_REQUEST_PREFIX)
            )
        for job_id in list(await session.scalars(jobs)):
            locked = await session.scalar(select(Job.id).where(Job.id == job_id).with_for_update(skip_locked=True))
            if locked is None:
                continue  # an answer being stored: the next look takes it
            expired = await session.execute(
                update(Prediction)
                .where(Prediction.job_id == job_id, *of_version)
                .values(status=PredictionStatus.expired.value, error=reason, finished_at=now)
            )
            count = cast(CursorResult[Any], expired).rowcount
            if (predictions := await _complete_job(session, job_id, now)) is not None:
                finished[job_id] = answers_payload(predictions)
            await session.commit()
            metrics.count_expired([(name, version)] * count)
    return finished


EXPIRE_CHUNK = 1000
"""Batch jobs expired per transaction by ``_expire_pending``."""


async def _expire_pending(session: AsyncSession, *, name: str, version: int, reason: str, now: datetime) -> None:
    """Expires with ``reason`` the predictions of ``name@version`` that batch jobs hold for the
    lane (``pending``), EXPIRE_CHUNK jobs per transaction, a few statements each (a batch of
    10,000 images is a few seconds' work, not one transaction per image); a job left with nothing
    pending is ``expired``. Jobs are locked before their predictions, as the lane and a cancel lock
    them; one locked by either is left to the next look. Commits."""
    waiting = select(Prediction.job_id).where(
        Prediction.model_name == name,
        Prediction.model_version == version,
        Prediction.status == PredictionStatus.pending.value,
    )
    while True:
        ids = list(
            await session.scalars(
                select(Job.id)
                .where(Job.status == PredictionStatus.pending.value, Job.id.in_(waiting))
                .limit(EXPIRE_CHUNK)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            await session.commit()
            return
        expired = await session.execute(
            update(Prediction)
            .where(
                Prediction.job_id.in_(ids),
                Prediction.model_name == name,
                Prediction.model_version == version,
                Prediction.status == PredictionStatus.pending.value,
            )
            .values(status=PredictionStatus.expired.value, error=reason, finished_at=now)
        )
        count = cast(CursorResult[Any], expired).rowcount
        still_pending = exists().where(Prediction.job_id == Job.id, Prediction.status == PredictionStatus.pending.value)
        await session.execute(
            update(Job)
            .where(Job.id.in_(ids), ~still_pending)
            .values(status=PredictionStatus.expired.value, finished_at=now)
        )
        await session.commit()
        metrics.count_expired([(name, version)] * count)
        if len(ids) < EXPIRE_CHUNK:
            return


async def unfinished_messages(*, session: AsyncSession, store: LocalBlobStore) -> list[JobMessage]:
    """Messages for every unfinished, unexpired prediction: what to enqueue again after Redis lost
    its streams. A job whose image file is missing from the store is failed with that reason
    (and commits) instead."""
    now = datetime.now(UTC)
    rows = await session.execute(
        select(Prediction, Job, Image)
        .join(Job, Prediction.job_id == Job.id)
        .join(Image, Job.image_id == Image.id)
        .where(Prediction.status.in_(UNFINISHED), Job.deadline_at > now)
    )
    messages: list[JobMessage] = []
    blobs: dict[str, bytes] = {}
    missing: set[uuid.UUID] = set()
    for prediction, job, image in rows.all():
        if image.sha256 not in blobs:
            try:
                blobs[image.sha256] = await store.get(image.sha256)
            except FileNotFoundError:
                missing.add(job.id)
                continue
        messages.append(job_message(job, prediction, image.sha256, blobs[image.sha256]))
    # A job whose image file is gone can never be answered: it fails with the reason, and the
    # others are queued again (one lost file must not keep every other job waiting).
    for job_id in missing:
        log.error("job %s: its image's file is missing from the store; failed", job_id)
        await fail_unfinished(session=session, job_id=job_id, reason="The image's file is missing from the store.")
    return messages


async def job_predictions(*, session: AsyncSession, job_id: uuid.UUID) -> list[Prediction]:
    """A job's predictions as stored now, in the order they were asked for."""
    return list(await session.scalars(_JOB_PREDICTIONS, {"b_job_id": job_id}))


async def get_owned_job(*, session: AsyncSession, owner_id: int, job_id: uuid.UUID) -> Job | None:
    """The job if it is the user's, with its predictions; None otherwise."""
    return await session.scalar(select(Job).where(Job.id == job_id, Job.owner_id == owner_id))


_JOBS_PAGE = TypeAdapter(list[JobPublic])


def _utc(column: str) -> str:
    """A timestamp column as ISO 8601 in UTC ("2026-01-31T12:00:00.000000Z"), whatever the
    session's TimeZone setting."""
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


_PAGE_OF_JOBS = f"""
WITH page AS (
    SELECT id, image_id, status, created_at, finished_at FROM jobs
    WHERE {{whose}} {{after}} {{images}}
    ORDER BY created_at DESC, id DESC
    OFFSET :skip LIMIT :limit
)
SELECT coalesce(json_agg(json_build_object(
    'job_id', page.id, 'image_id', page.image_id, 'status', page.status,
    'created_at', {_utc("page.created_at")}, 'finished_at', {_utc("page.finished_at")},
    'results', coalesce((
        SELECT json_agg(json_build_object(
            'id', p.id, 'model', p.model_name, 'version', p.model_version, 'status', p.status,
            'label', p.label, 'score', p.score,
            'top_k', coalesce(nullif(p.top_k, 'null'::jsonb), '[]'::jsonb), 'cached', p.cached,
            'random_weights', p.random_weights, 'error', p.error,
            'timings', json_build_object(
                'queue_ms', p.queue_ms, 'preprocess_ms', p.preprocess_ms, 'inference_ms', p.inference_ms,
                'total_ms', p.total_ms, 'batch_size', p.batch_size
            )
        ) ORDER BY p.position)
        FROM predictions p WHERE p.job_id = page.id
    ), '[]'::json)
) ORDER BY page.created_at DESC, page.id DESC), '[]'::json)::text
FROM page
"""
PAGES_OF_JOBS = {
    (after, images): text(
        _PAGE_OF_JOBS.format(
            whose="owner_id = :owner_id",
            after="AND (created_at, id) < (:after_created_at, :after_id)" if after else "",
            images="AND image_id = ANY(:image_ids)" if images else "",
        )
    )
    for after in (False, True)
    for images in (False, True)
}
"""The page statement for each (after a cursor, only some images): each is planned with its
own conditions, so a deep cursor is an index range, not a filter."""


async def list_jobs(
    *,
    session: AsyncSession,
    redis: Redis,
    owner_id: int,
    page: KeysetPage,
    image_ids: list[uuid.UUID] | None = None,
) -> JobsPublic:
    """A page of the user's jobs with their answers, newest first (a queued answer a worker has
    taken shows as running); their count when asked; the next page's cursor. Only the jobs of
    ``image_ids`` when given.

    PostgreSQL builds the page as one JSON document (the page of jobs, each with its answers in
    the order asked for), validated in one call: no row objects, no per-row decoding in Python."""
    params: dict[str, Any] = {"owner_id": owner_id, "skip": page.skip, "limit": page.limit + 1}
    if page.after is not None:
        params |= {"after_created_at": page.after.created_at, "after_id": page.after.id}
    if image_ids is not None:
        params["image_ids"] = image_ids
    statement = PAGES_OF_JOBS[(page.after is not None, image_ids is not None)]
    found = _JOBS_PAGE.validate_json(await session.scalar(statement, params) or "[]")
    jobs, next_cursor = split_page(found, page, lambda job: (job.created_at, job.job_id))
    queued = PredictionStatus.queued.value
    running = await _running(redis, [a.id for job in jobs for a in job.results if a.status == queued])
    for job in jobs if running else ():
        taken = [a for a in job.results if a.id in running]
        for answer in taken:
            answer.status = PredictionStatus.running.value
        if job.status == queued and taken:
            job.status = PredictionStatus.running.value
    where = [Job.owner_id == owner_id] + ([Job.image_id.in_(image_ids)] if image_ids is not None else [])
    return JobsPublic(data=jobs, count=await count_of(session, Job, *where, page=page), next_cursor=next_cursor)


IMAGE_JOBS = 50
"""Jobs an image's detail (``GET /v1/images/{id}``) shows, newest first: a default page of
``GET /v1/predictions``, where ``?image_id=`` pages through the rest."""
# The image's jobs alone (they are all its owner's), read newest first through
# ix_jobs_image_created: with the owner's condition too, PostgreSQL may walk ix_jobs_owner_created
# through every newer job of the owner's other images to find these (measured: 20,000 rows for 51).
_IMAGE_JOBS_PAGE = text(_PAGE_OF_JOBS.format(whose="image_id = :image_id", after="", images=""))
_IMAGE_JOBS_COUNT = select(func.count()).select_from(_jobs).where(_jobs.c.image_id == bindparam("b_image_id"))


class ImageJobs(NamedTuple):
    """An image's newest jobs (``jobs_of_image``)."""

    jobs: list[JobPublic]
    """At most ``IMAGE_JOBS``, newest first, each with its answers in the order asked for."""
    total: int
    """All the image's jobs."""
    next_cursor: str | None
    """``cursor`` of ``GET /v1/predictions?image_id=`` for the older ones; None when these are all."""


async def jobs_of_image(*, session: AsyncSession, image_id: uuid.UUID, limit: int = IMAGE_JOBS) -> ImageJobs:
    """The newest ``limit`` jobs of an image, as ``list_jobs`` gives them (one JSON document built
    by PostgreSQL; queued answers shown as stored), how many it has in all and the cursor of the
    rest. An image predicted thousands of times sends a page, not its history; the count is asked
    for only when there are more than ``limit``."""
    params = {"image_id": image_id, "skip": 0, "limit": limit + 1}
    found = _JOBS_PAGE.validate_json(await session.scalar(_IMAGE_JOBS_PAGE, params) or "[]")
    jobs, next_cursor = split_page(found, KeysetPage(limit=limit), lambda job: (job.created_at, job.job_id))
    if next_cursor is None:
        return ImageJobs(jobs, len(jobs), None)
    count = await session.scalar(_IMAGE_JOBS_COUNT, {"b_image_id": image_id})
    return ImageJobs(jobs, int(count or 0), next_cursor)


# The newest done answer of each model version to an image, one row each, newest first. PostgreSQL
# reads the image's jobs (ix_jobs_image_created) and each one's answers (the unique index on job_id,
# model_name, model_version), a few pages per job, and sends only those rows. OFFSET 0 keeps the
# answers a subquery read per job by job_id alone (no condition enters a subquery with OFFSET):
# joined plainly, the planner may hash the image's jobs with a scan of all predictions (24,000
# rows read for one image's 4,000), or, before ANALYZE, read ix_predictions_status whole for each
# job (0.5 s for 5,000 jobs).
_LATEST_ANSWERS = text(f"""
SELECT model_name, model_version, top_k FROM (
    SELECT DISTINCT ON (p.model_name, p.model_version)
        p.model_name, p.model_version, p.top_k, p.position, j.created_at, j.id AS job_id
    FROM jobs j CROSS JOIN LATERAL (
        SELECT model_name, model_version, status, top_k, position FROM predictions WHERE job_id = j.id OFFSET 0
    ) p
    WHERE j.image_id = :image_id AND p.status = '{PredictionStatus.done.value}'
    ORDER BY p.model_name, p.model_version, j.created_at DESC, j.id DESC
) newest
ORDER BY created_at DESC, job_id DESC, position
""").columns(model_name=String, model_version=Integer, top_k=JSONB)


async def latest_answers(*, session: AsyncSession, image_id: uuid.UUID) -> list[str]:
    """One line per model version, ``name@version: label score, ...`` (top 3, scores to 2 places),
    from its newest successful answer to the image; the versions in the order of those answers,
    newest job first, then as the job asked for them."""
    lines: list[str] = []
    for name, version, top_k in await session.execute(_LATEST_ANSWERS, {"image_id": image_id}):
        top = ", ".join(f"{t['label']} {t['score']:.2f}" for t in (top_k or [])[:3])
        lines.append(f"{name}@{version}: {top}")
    return lines


async def render_image_view(*, session: AsyncSession, store: LocalBlobStore, settings: Settings, image: Image) -> bytes:
    """The image as PNG with its ``latest_answers`` written under it (``images.service.render_view``).
    ``session`` (the one ``image`` was read with) is closed once the answers are read, its
    connection back in the pool before the decode: a large progressive JPEG takes a second or more,
    and a few views holding connections all along would leave every other request without one."""
    lines = await latest_answers(session=session, image_id=image.id)
    await session.close()
    return await images_service.render_view(store=store, settings=settings, image=image, lines=lines)


async def running_ids(redis: Redis, predictions: list[Prediction]) -> set[uuid.UUID]:
    """Ids of the queued predictions a worker has taken (its running flag is set in Redis)."""
    return await _running(redis, [p.id for p in predictions if p.status == PredictionStatus.queued.value])


async def _running(redis: Redis, queued: list[uuid.UUID]) -> set[uuid.UUID]:
    """Those of the ``queued`` prediction ids whose running flag a worker has set in Redis."""
    if not queued:
        return set()
    flags = await redis.mget([keys.job_running_key(str(pid)) for pid in queued])
    return {pid for pid, flag in zip(queued, flags, strict=True) if flag is not None}
