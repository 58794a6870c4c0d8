"""The batch lane: a batch's jobs wait in PostgreSQL (``pending``) and enter the job queue a few at
a time (BATCH_IN_FLIGHT over all batches), so a person's request waits behind at most that many
batch jobs whatever the batches hold. Batches take turns (``_in_turn``): the accounts with a batch
running one job each in turn, and an account's batches one job each in turn, so one account's
10,000 images do not hold back another's later 10, nor its own. Every API process runs the lane; a
transaction lock makes one of them queue at a time."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection, Iterable, Set
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis
from sqlalchemy import ColumnElement, and_, exists, func, literal_column, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.batches.models import Batch, BatchItem
from api.app.core import metrics
from api.app.core.db import OWNER_KEY_SHARE
from api.app.core.errors import BlobMissing
from api.app.images.models import Image
from api.app.images.storage import LocalBlobStore
from api.app.predictions import queue
from api.app.predictions.models import UNFINISHED, UNFINISHED_JOB, Job, Prediction
from api.app.predictions.service import job_message
from api.app.users.models import User
from contracts import keys
from contracts.messages import Heartbeat, PredictionStatus
from contracts.registry import Registry

log = logging.getLogger("api.batches")

PENDING = PredictionStatus.pending.value
OPEN = (PENDING, *UNFINISHED)


_UNFINISHED_BATCH = or_(Batch.status == "running", and_(Batch.status == "cancelled", Batch.finished_at.is_(None)))
"""A batch running, or cancelled while some of its jobs were queued: their answers are still to come."""


async def any_running(*, session: AsyncSession) -> bool:
    """Whether a batch is running, or cancelled with answers still to come (a small table: one
    row per batch)."""
    return await session.scalar(select(Batch.id).where(_UNFINISHED_BATCH).limit(1)) is not None


def servable(registry: Registry, beats: Iterable[Heartbeat]) -> set[str]:
    """The model versions (keys like ``sketch@3``) the lane may queue batch jobs for: ready in a
    live worker's heartbeat (``beats``) and enabled and not retired in ``registry``. A worker lists
    a version it is about to let go of until it has: a job queued for it then would wait for its
    enabling again, or expire for good if it was retired."""
    live = {m.key for m in registry.models if m.enabled and m.channel != "retired"}
    return {f"{m.name}@{m.version}" for beat in beats for m in beat.models if m.ready} & live


def retired_versions(registry: Registry) -> set[str]:
    """The model versions (keys like ``sketch@3``) retired in ``registry``: their pending
    predictions are expired, so a batch naming one is not waiting for a worker."""
    return {m.key for m in registry.models if m.channel == "retired"}


def _refs(job: Job) -> set[str]:
    """The versions a job still waits for (a version retired meanwhile has its predictions expired)."""
    return {f"{p.model_name}@{p.model_version}" for p in job.predictions if p.status in OPEN}


def _asks_for_any_but(served: Set[str]) -> ColumnElement[bool]:
    """Whether a job waits for a prediction of a model version outside ``served`` (keys like
    ``sketch@3``)."""
    ref = func.concat(Prediction.model_name, "@", Prediction.model_version)
    return (
        exists()
        .where(Prediction.job_id == Job.id, Prediction.status == PENDING, ref.not_in(sorted(served)))
        .correlate(Job)
    )


LOOKS_PER_TOP_UP = 50
"""How many times one ``top_up`` takes jobs again when all it took failed (their stored files
missing): the next batches in turn go on at once, not one failed job per second."""


async def top_up(
    *,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    in_flight: int,
    job_seconds: float,
    served: Set[str] | None = None,
    retired: Set[str] = frozenset(),
) -> int:
    """Queues pending jobs of received batches (``running``: a batch still being received, or
    left so by a process that died receiving it, waits), in turn (``_in_turn``), until
    ``in_flight`` batch jobs are queued or running, each with a deadline ``job_seconds`` from
    now; none while people's jobs wait in the queues they would join, not yet taken by a worker
    (``_people_waiting``). Only jobs whose every model version a live worker serves (``served``,
    keys like ``sketch@3``; None: not checked) are queued or counted in flight, so a batch for a
    model no worker serves waits without holding up the others; while none serves them, the
    deadlines of those already queued are held (``_hold_deadlines``). ``retired``: versions
    retired in the registry, whose pending predictions are expired (a batch naming one may still
    have jobs to queue). A job whose image's stored file is missing is failed with
    ``MISSING_FILE``, taking its batch's turn, and the next jobs in turn are taken at once. With
    none pending, marks the finished batches ``done``. How many jobs it queued. Raises what Redis
    and PostgreSQL raise (the job rows roll back)."""
    queued = 0
    for _ in range(LOOKS_PER_TOP_UP):
        took, failed = await _top_up_once(
            session=session,
            redis=redis,
            store=store,
            in_flight=in_flight,
            job_seconds=job_seconds,
            served=served,
            retired=retired,
        )
        queued += took
        if not failed or took:
            break
    return queued


async def _top_up_once(
    *,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    in_flight: int,
    job_seconds: float,
    served: Set[str] | None,
    retired: Set[str],
) -> tuple[int, int]:
    """One look of ``top_up``: how many jobs it queued, and how many it failed."""
    await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('batch-lane', 0))"))
    flying = list(
        await session.scalars(select(Job).where(UNFINISHED_JOB, Job.request_id.startswith(keys.BATCH_REQUEST_PREFIX)))
    )
    now = datetime.now(UTC)
    _hold_deadlines(flying, served=served, now=now, job_seconds=job_seconds)
    busy = sum(1 for j in flying if served is None or _refs(j) <= served)
    room = in_flight - busy
    if room <= 0:
        await session.commit()
        return 0, 0
    jobs = await _in_turn(session=session, redis=redis, room=room, served=served, retired=retired)
    if not jobs:
        await session.commit()
        await finish(session=session)  # the last answers are in: batches may be over
        return 0, 0
    # The queues these jobs would join: a version retired meanwhile has its predictions expired,
    # and its queue may keep a message no worker will read, which is no person waiting.
    streams = sorted(
        {keys.job_stream(p.model_name, p.model_version) for j in jobs for p in j.predictions if p.status == PENDING}
    )
    if await _people_waiting(redis, streams, flying=len(flying)):
        # People's jobs are waiting in these queues: the batch waits for the next answer or look.
        await session.commit()
        return 0, 0
    found = await session.execute(select(Image.id, Image.sha256).where(Image.id.in_({j.image_id for j in jobs})))
    shas = {image_id: sha256 for image_id, sha256 in found}
    deadline = now + timedelta(seconds=job_seconds)
    messages = []
    failed: list[tuple[str, int]] = []
    queued = 0
    for job in jobs:
        try:
            data = await store.get(shas[job.image_id])
        except BlobMissing:
            # A file gone from the store (a lost disk, a file removed by hand) fails its own job
            # only: raised, it would stop every batch of every user at this job, look after look.
            log.warning("batch job %s: the stored file of image %s is missing; failed", job.id, job.image_id)
            failed += _fail(job, MISSING_FILE, now)
            continue
        job.status, job.deadline_at = PredictionStatus.queued.value, deadline
        queued += 1
        for prediction in job.predictions:
            if prediction.status == PENDING:
                prediction.status = PredictionStatus.queued.value
                messages.append(job_message(job, prediction, shas[job.image_id], data))
    # Queued before the commit: an answer arriving first waits for these rows' lock.
    await queue.enqueue(redis, messages)
    await session.commit()
    metrics.count_failed(failed)
    await _took_turns(redis, jobs)
    return queued, len(jobs) - queued


async def _in_turn(
    *, session: AsyncSession, redis: Redis, room: int, served: Set[str] | None, retired: Set[str]
) -> list[Job]:
    """Up to ``room`` pending jobs of running batches, locked, in turn order: the accounts whose
    batch jobs were taken least recently first (``keys.BATCH_TURNS``; those never served first,
    by their oldest running batch), each with its next batch in turn (the same order among its
    own batches) that has a job to queue; one job of each in that order, round after round. A
    batch's own jobs go oldest first. Only jobs whose every model version is in ``served`` (None:
    not checked): a batch naming a version that is neither served nor ``retired`` waits for a
    worker and is not even looked at, so it neither takes a turn nor costs the look a query.
    Raises what Redis and PostgreSQL raise."""
    running = (
        await session.execute(
            select(Batch.id, Batch.owner_id, Batch.created_at, Batch.models)
            .where(Batch.status == _literal("running"))
            .order_by(Batch.created_at)
        )
    ).all()
    if served is not None:
        running = [row for row in running if all(m in served or m in retired for m in row.models)]
    if not running:
        return []
    owners = sorted({row.owner_id for row in running})
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zmscore(keys.BATCH_TURNS, [_owner_member(o) for o in owners])
        pipe.zmscore(keys.BATCH_TURNS, [_batch_member(row.id) for row in running])
        owner_turns, batch_turns = await pipe.execute()
    last_owner = dict(zip(owners, owner_turns, strict=True))
    last_batch = {row.id: t for row, t in zip(running, batch_turns, strict=True)}
    # Never served (no turn yet) before served, then the least recently served; ties (and
    # those never served) by their oldest running batch.
    oldest: dict[int, datetime] = {}
    by_owner: dict[int, list[tuple[uuid.UUID, datetime]]] = {}
    for row in running:
        oldest.setdefault(row.owner_id, row.created_at)
        by_owner.setdefault(row.owner_id, []).append((row.id, row.created_at))
    order = sorted(owners, key=lambda o: (last_owner[o] is not None, last_owner[o] or 0.0, oldest[o]))
    queues = [
        sorted(by_owner[o], key=lambda b: (last_batch[b[0]] is not None, last_batch[b[0]] or 0.0, b[1])) for o in order
    ]
    taken: list[list[Job]] = []
    # Round after round, each account gives its next batch that has a job to queue: one that
    # has none (its jobs wait for a version being retired) does not cost its account the turn.
    while len(taken) < room and any(queues):
        for batches in queues:
            while batches and len(taken) < room:
                found = await _next_jobs(session, batches.pop(0)[0], room=room, served=served)
                if found:
                    taken.append(found)
                    break
    jobs: list[Job] = []
    for i in range(room):
        jobs += [batch_jobs[i] for batch_jobs in taken if i < len(batch_jobs)]
    return jobs[:room]


async def _next_jobs(session: AsyncSession, batch_id: uuid.UUID, *, room: int, served: Set[str] | None) -> list[Job]:
    """The batch's oldest ``room`` pending jobs whose every version is in ``served`` (None: not
    checked), locked (``ix_jobs_pending_request``)."""
    pending = select(Job).where(
        Job.request_id == f"{keys.BATCH_REQUEST_PREFIX}{batch_id}", Job.status == _literal(PENDING)
    )
    if served is not None:
        pending = pending.where(~_asks_for_any_but(served))
    return list(
        await session.scalars(
            pending.order_by(Job.created_at, Job.id).limit(room).with_for_update(of=Job, skip_locked=True)
        )
    )


def _literal(status: str) -> ColumnElement[str]:
    """``status`` as an SQL literal: PostgreSQL uses a partial index (``ix_jobs_pending_request``,
    ``ix_batches_running``) only when the query's condition visibly implies the index's own, which
    a bound parameter in a cached generic plan does not."""
    return literal_column(f"'{status}'")


def _owner_member(owner_id: int) -> str:
    return f"owner:{owner_id}"


def _batch_member(batch_id: uuid.UUID | str) -> str:
    return f"batch:{batch_id}"


TURNS_KEPT = 10_000
"""How many accounts and batches ``keys.BATCH_TURNS`` remembers (the most recently served): a
batch or account forgotten only goes first once more."""


async def _took_turns(redis: Redis, jobs: list[Job]) -> None:
    """Records in ``keys.BATCH_TURNS`` that the accounts and batches of ``jobs`` (just queued, or
    failed) were served now, in their order. A turn is the Redis server's clock (``TIME``, in
    microseconds), so API hosts with clocks apart agree, and a turn is never below an earlier one
    however the set was emptied meanwhile. Raises what Redis raises."""
    if not jobs:
        return
    seconds, microseconds = await redis.time()
    now = seconds * 1_000_000 + microseconds
    turns: dict[str, float] = {}
    for i, job in enumerate(jobs):
        turn = float(now + i)
        turns[_owner_member(job.owner_id)] = turn
        turns[_batch_member(job.request_id.removeprefix(keys.BATCH_REQUEST_PREFIX))] = turn
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.BATCH_TURNS, turns)
        pipe.zremrangebyrank(keys.BATCH_TURNS, 0, -TURNS_KEPT - 1)
        await pipe.execute()


async def _people_waiting(redis: Redis, streams: list[str], *, flying: int) -> bool:
    """Whether people's jobs wait in ``streams`` for a worker: the streams hold more entries than
    the ``flying`` batch jobs, and some entries are not delivered to a worker yet. A person's job
    a worker has taken (pending in the consumer group) waits for no batch job queued now, and
    counting it would let a person sending one picture after another, each as soon as the last
    was answered, hold every batch back for as long as they go on (the lane looks at once after
    an answer, when their next job is already there). Raises what Redis raises."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            pipe.xpending(stream, keys.JOB_GROUP)
        replies = await pipe.execute(raise_on_error=False)
    lengths, pending = replies[0::2], replies[1::2]
    for reply in lengths:
        if isinstance(reply, Exception):
            raise reply
    if sum(lengths) <= flying:
        return False
    # A stream without the group yet (no worker ever read it): every entry of it is undelivered.
    delivered = sum(int(p["pending"]) for p in pending if isinstance(p, dict))
    return sum(lengths) - delivered > 0


def _hold_deadlines(flying: list[Job], *, served: Set[str] | None, now: datetime, job_seconds: float) -> None:
    """Moves the deadline of each queued or running batch job of a model version no live worker
    serves now (outside ``served``) to ``job_seconds`` from ``now`` once less than half of that is
    left: a worker outage stops a batch job's clock, so the job is computed when a worker is back
    instead of expiring with the outage (its message allows for that:
    ``predictions.service.BATCH_MESSAGE_SLACK``), and a long outage writes its row once every
    ``job_seconds / 2``, not at every look. The caller commits."""
    if served is None:
        return
    for job in flying:
        if not _refs(job) <= served and job.deadline_at < now + timedelta(seconds=job_seconds / 2):
            job.deadline_at = now + timedelta(seconds=job_seconds)


MISSING_FILE = "The stored file of this image is missing from the portal's storage; send the image again."


def _fail(job: Job, reason: str, now: datetime) -> list[tuple[str, int]]:
    """Fails ``job`` and its pending predictions with ``reason``; the ``(model, version)`` of each
    prediction failed, for ``metrics.count_failed`` once committed."""
    job.status, job.finished_at = PredictionStatus.failed.value, now
    failed = []
    for prediction in job.predictions:
        if prediction.status == PENDING:
            prediction.status, prediction.error, prediction.finished_at = PredictionStatus.failed.value, reason, now
            failed.append((prediction.model_name, prediction.model_version))
    return failed


async def finish(*, session: AsyncSession) -> None:
    """Marks ``done`` the running batches whose every job is final, and gives the cancelled ones
    whose last queued job was answered their ``finished_at``."""
    still_open = (
        select(BatchItem.id)
        .join(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == Batch.id, Job.status.in_(OPEN))
        .exists()
    )
    now = datetime.now(UTC)
    await session.execute(
        update(Batch).where(Batch.status == "running", ~still_open).values(status="done", finished_at=now)
    )
    await session.execute(
        update(Batch)
        .where(Batch.status == "cancelled", Batch.finished_at.is_(None), ~still_open)
        .values(finished_at=now)
    )
    await session.commit()


CANCELLED = "the batch was cancelled"
"""Why a cancelled batch's jobs have no answer, unless the cancel says otherwise."""
OWNER_DEACTIVATED = "the batch was cancelled: its owner's account was deactivated"


async def cancel(
    *,
    session: AsyncSession,
    batch: Batch,
    only_if: Collection[str] = ("receiving", "running", "cancelled"),
    reason: str = CANCELLED,
) -> int | None:
    """Cancels what of the batch has not been queued yet (what is queued still gets its answer),
    when its status (read once its row is locked) is one of ``only_if``; how many jobs were
    cancelled, None when it was not (another status, or gone with its owner). The cancelled
    predictions carry ``reason`` as their error. A batch cancelled while ``receiving`` lets go of
    its ``idempotency_key``. Commits.

    Locks in the order every writer of a batch takes them: its owner's row (``OWNER_KEY_SHARE``,
    as deleting the user takes it first), the batch's row (as the request receiving it takes it
    before it commits its status), then its jobs and their predictions (as the lane and the
    result collector do). A batch whose owner was deleted meanwhile is gone: nothing to do."""
    if (await session.execute(OWNER_KEY_SHARE, {"b_owner_id": batch.owner_id})).first() is None:
        await session.rollback()
        return None
    await session.refresh(batch, with_for_update=True)
    if batch.status not in only_if:
        await session.commit()
        return None
    now = datetime.now(UTC)
    jobs = select(BatchItem.job_id).where(BatchItem.batch_id == batch.id, BatchItem.job_id.is_not(None))
    # Jobs before their predictions, the order the lane and the result collector lock them in.
    cancelled = await session.execute(
        update(Job)
        .where(Job.id.in_(jobs), Job.status == PENDING)
        .values(status=PredictionStatus.cancelled.value, finished_at=now)
        .returning(Job.id)
    )
    ids = [row[0] for row in cancelled.all()]
    if ids:
        await session.execute(
            update(Prediction)
            .where(Prediction.job_id.in_(ids), Prediction.status == PENDING)
            .values(status=PredictionStatus.cancelled.value, error=reason, finished_at=now)
        )
    count = len(ids)
    open_left = await session.scalar(
        select(exists().where(BatchItem.batch_id == batch.id, BatchItem.job_id == Job.id, Job.status.in_(OPEN)))
    )
    if batch.status == "receiving":
        # Never fully received: sending the same request again with its key makes a new batch.
        batch.idempotency_key = None
    batch.status = "cancelled"
    if not open_left and batch.finished_at is None:
        batch.finished_at = now
    await session.commit()
    return count


async def cancel_of_deactivated_owners(*, session: AsyncSession) -> int:
    """Cancels the batches still ``receiving`` or ``running`` whose owner's account is deactivated
    (``cancel_if_owner_inactive``; what is queued still gets its answer): an account's work stops
    with it, and does not come back if it is reactivated. How many batches were cancelled. Commits."""
    # The deactivated accounts first (few, and the users table does not grow with history), then
    # their batches through the (owner_id, ...) index: never a read of every batch ever sent.
    inactive = list(await session.scalars(select(User.id).where(User.is_active.is_(False))))
    if not inactive:
        await session.commit()
        return 0
    stopped = (
        await session.execute(
            select(Batch.id, Batch.owner_id).where(
                Batch.owner_id.in_(inactive), Batch.status.in_(("receiving", "running"))
            )
        )
    ).all()
    await session.commit()
    cancelled = 0
    for batch_id, owner_id in stopped:
        cancelled += await cancel_if_owner_inactive(session=session, batch_id=batch_id, owner_id=owner_id)
    return cancelled


async def cancel_if_owner_inactive(*, session: AsyncSession, batch_id: uuid.UUID, owner_id: int) -> bool:
    """Cancels the batch (``cancel``, with ``OWNER_DEACTIVATED``) if its owner's account is still
    deactivated once its row is locked (``FOR SHARE``, taken before the batch's as every writer of
    a batch does): an account reactivated since the sweep read it keeps its batch, and one
    reactivated meanwhile waits for the cancel's commit. Whether it was cancelled. Commits."""
    active = await session.scalar(select(User.is_active).where(User.id == owner_id).with_for_update(read=True))
    batch = await session.get(Batch, batch_id) if active is False else None
    if batch is None:
        await session.commit()
        return False
    done = await cancel(session=session, batch=batch, only_if=("receiving", "running"), reason=OWNER_DEACTIVATED)
    return done is not None


def left_by_its_process(stale_after: timedelta) -> ColumnElement[bool]:
    """SQL condition: the batch is still ``receiving`` and the request receiving it has not noted
    that it is alive for ``stale_after`` (its ``received_at``, or its creation before the first
    note): that request is gone (its API process died or was stopped)."""
    cutoff = datetime.now(UTC) - stale_after
    return and_(Batch.status == "receiving", func.coalesce(Batch.received_at, Batch.created_at) < cutoff)


async def cancel_orphaned(*, session: AsyncSession, stale_after: timedelta) -> int:
    """Cancels the batches ``left_by_its_process(stale_after)``. Their stored images keep what was
    answered; their pending jobs are cancelled, so they no longer count against their owner's
    batch quota. How many batches were cancelled. Commits."""
    stale = list(await session.scalars(select(Batch.id).where(left_by_its_process(stale_after))))
    cancelled = 0
    for batch_id in stale:
        batch = await session.get(Batch, batch_id)
        # Cancelled only if still receiving once locked: a request finishing meanwhile made it running.
        if batch is not None and batch.status == "receiving":
            cancelled += await cancel(session=session, batch=batch, only_if=("receiving",)) is not None
    await session.commit()
    return cancelled
