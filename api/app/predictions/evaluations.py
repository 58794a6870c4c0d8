"""Offline evaluations: two versions of a model run on the same labelled images, a few jobs at a
time, their answers kept with the evaluation (never shown to users). The API's reconciler tops
the queue up, expires what no worker answered and finishes evaluations with nothing left."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import cast

from redis.asyncio import Redis
from sqlalchemy import Integer, Table, and_, case
from sqlalchemy import cast as sql_cast
from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.images.storage import LocalBlobStore
from api.app.predictions import queue
from api.app.predictions.models import UNFINISHED, Evaluation, EvaluationAnswer
from api.app.predictions.schemas import EvaluationPublic, EvaluationVersion
from contracts.messages import JobMessage, PredictionStatus, ResultMessage

log = logging.getLogger("api.evaluations")

PENDING = "pending"
"""An answer not queued yet: it waits in PostgreSQL until fewer than EVALUATION_IN_FLIGHT are queued."""
_OPEN = (PENDING, *UNFINISHED)
_ANSWERED = (PredictionStatus.done.value, PredictionStatus.failed.value)
"""An answer a worker gave: what counts as an evaluation's progress (``expire_overdue``)."""
_answers = cast(Table, EvaluationAnswer.__table__)


@dataclass(frozen=True)
class LabelledImage:
    image_id: uuid.UUID
    sha256: str
    truth: str
    """The label a user's verdict gave the image (the answer they confirmed, or the one they
    said was right)."""


async def start(
    *,
    session: AsyncSession,
    name: str,
    candidate: int,
    baseline: int,
    images: Sequence[LabelledImage],
    requested_by: str,
) -> Evaluation:
    """Stores an evaluation of ``name@candidate`` against ``name@baseline`` on ``images``, every
    answer pending; ``top_up`` queues them. ``images`` must not be empty."""
    evaluation = Evaluation(
        model_name=name,
        candidate=candidate,
        baseline=baseline,
        status="running",
        images=len(images),
        requested_by=requested_by,
    )
    session.add(evaluation)
    await session.flush()
    rows = [
        {
            "id": uuid.uuid4(),
            "evaluation_id": evaluation.id,
            "image_id": image.image_id,
            "sha256": image.sha256,
            "truth": image.truth,
            "model_version": version,
            "status": PENDING,
        }
        for version in (candidate, baseline)
        for image in images
    ]
    await session.execute(insert(_answers), rows)
    await session.commit()
    return evaluation


async def any_running(*, session: AsyncSession) -> bool:
    """Whether any evaluation is running (one row per evaluation: a small table)."""
    return await session.scalar(select(Evaluation.id).where(Evaluation.status == "running").limit(1)) is not None


async def top_up(
    *,
    session: AsyncSession,
    redis: Redis,
    store: LocalBlobStore,
    in_flight: int,
    job_seconds: float,
    served: Set[str] | None = None,
) -> int:
    """Queues pending answers of running evaluations until ``in_flight`` per model version are
    queued (over all its evaluations),
    then finishes evaluations with nothing left open; the number of jobs queued. A version no
    live worker serves (``served``, keys like ``sketch@2``; None: not checked) gets none: its
    answers wait, and expire if it stays so (``expire_overdue``).

    Each version's count and queueing hold a transaction-level advisory lock, so two callers (the
    result collector and the reconcile loop, or two API processes) never both see the same room
    and queue twice the bound; a job queued twice (Redis failed after the queue took it) is
    answered once."""
    queued = 0
    running = list(await session.scalars(select(Evaluation).where(Evaluation.status == "running")))
    for evaluation in running:
        for version in (evaluation.candidate, evaluation.baseline):
            if served is not None and f"{evaluation.model_name}@{version}" not in served:
                continue
            await session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended('evaluation-top-up', 0))"))
            # Counted over every evaluation of the model: two that share a version (both against
            # the stable one, say) share its bound.
            busy = await session.scalar(
                select(func.count())
                .select_from(EvaluationAnswer)
                .join(Evaluation, EvaluationAnswer.evaluation_id == Evaluation.id)
                .where(
                    Evaluation.model_name == evaluation.model_name,
                    EvaluationAnswer.model_version == version,
                    EvaluationAnswer.status.in_(UNFINISHED),
                )
            )
            room = in_flight - int(busy or 0)
            if room <= 0:
                continue
            answers = list(
                await session.scalars(
                    select(EvaluationAnswer)
                    .where(
                        EvaluationAnswer.evaluation_id == evaluation.id,
                        EvaluationAnswer.model_version == version,
                        EvaluationAnswer.status == PENDING,
                    )
                    .limit(room)
                    .with_for_update(skip_locked=True)
                )
            )
            if not answers:
                continue
            deadline = datetime.now(UTC) + timedelta(seconds=job_seconds)
            messages = []
            for answer in answers:
                answer.status = PredictionStatus.queued.value
                answer.deadline_at = deadline
                messages.append(
                    JobMessage(
                        job_id=str(evaluation.id),
                        prediction_id=str(answer.id),
                        model=evaluation.model_name,
                        version=version,
                        sha256=answer.sha256,
                        request_id=f"evaluation-{evaluation.id}",
                        deadline=deadline.timestamp(),
                        evaluation=str(evaluation.id),
                        image=await store.get(answer.sha256),
                    )
                )
            # Queued before the commit: an answer arriving first finds its row still open.
            await queue.enqueue(redis, messages)
            await session.commit()
            queued += len(messages)
    await _finish(session)
    return queued


async def _finish(session: AsyncSession) -> None:
    still_open = (
        select(EvaluationAnswer.id)
        .where(EvaluationAnswer.evaluation_id == Evaluation.id, EvaluationAnswer.status.in_(_OPEN))
        .exists()
    )
    await session.execute(
        update(Evaluation)
        .where(Evaluation.status == "running", ~still_open)
        .values(status="done", finished_at=datetime.now(UTC))
    )
    await session.commit()


async def store_answer(*, session: AsyncSession, result: ResultMessage) -> None:
    """Keeps a worker's answer to an evaluation's job once (a duplicate finds its row final)."""
    label, score = queue.top1(result.top_k)
    await session.execute(
        update(EvaluationAnswer)
        .where(EvaluationAnswer.id == uuid.UUID(result.prediction_id), EvaluationAnswer.status.in_(_OPEN))
        .values(
            status=result.status.value,
            label=label,
            score=score,
            total_ms=result.timings.total_ms,
            error=result.error,
            finished_at=datetime.now(UTC),
        )
    )
    await session.commit()


async def expire_overdue(*, session: AsyncSession, grace_seconds: float, stall_seconds: float) -> None:
    """Expires queued answers no worker gave by their deadline (a version unloaded meanwhile, a
    queue lost with Redis's data), and the pending answers of an evaluation that has none in
    flight and got no worker's answer (done or failed) for ``stall_seconds`` (no worker serves a
    version), so every evaluation finishes. Answers expired here are no progress: counted as such,
    an evaluation whose queued answers just expired would wait ``stall_seconds`` more.

    The stalled ones first: in the pass that expires an evaluation's last queued answers it is
    not stalled yet, and ``top_up`` queues the next ones for a version a worker still serves."""
    now = datetime.now(UTC)
    last_answer = (
        select(func.max(EvaluationAnswer.finished_at))
        .where(EvaluationAnswer.evaluation_id == Evaluation.id, EvaluationAnswer.status.in_(_ANSWERED))
        .scalar_subquery()
    )
    in_flight = (
        select(EvaluationAnswer.id)
        .where(EvaluationAnswer.evaluation_id == Evaluation.id, EvaluationAnswer.status.in_(UNFINISHED))
        .exists()
    )
    stalled = select(Evaluation.id).where(
        Evaluation.status == "running",
        ~in_flight,
        func.coalesce(last_answer, Evaluation.created_at) < now - timedelta(seconds=stall_seconds),
    )
    await session.execute(
        update(EvaluationAnswer)
        .where(EvaluationAnswer.status == PENDING, EvaluationAnswer.evaluation_id.in_(stalled))
        .values(
            status=PredictionStatus.expired.value,
            error=f"no worker served the version for {stall_seconds:g} s",
            finished_at=now,
        )
    )
    await session.execute(
        update(EvaluationAnswer)
        .where(
            EvaluationAnswer.status.in_(UNFINISHED),
            EvaluationAnswer.deadline_at < now - timedelta(seconds=grace_seconds),
        )
        .values(
            status=PredictionStatus.expired.value, error="deadline passed before a worker answered", finished_at=now
        )
    )
    await session.commit()


async def cancel(*, session: AsyncSession, evaluation: Evaluation) -> None:
    """Ends a running evaluation now: what is not answered yet is marked cancelled (answers of
    jobs already queued are still kept when they come)."""
    now = datetime.now(UTC)
    await session.execute(
        update(EvaluationAnswer)
        .where(EvaluationAnswer.evaluation_id == evaluation.id, EvaluationAnswer.status == PENDING)
        .values(status="cancelled", error="the evaluation was cancelled", finished_at=now)
    )
    evaluation.status, evaluation.finished_at = "cancelled", now
    await session.commit()


async def running_of(*, session: AsyncSession, name: str, candidate: int, baseline: int) -> Evaluation | None:
    """The running evaluation of this pair of versions, if any."""
    return await session.scalar(
        select(Evaluation).where(
            Evaluation.model_name == name,
            Evaluation.candidate == candidate,
            Evaluation.baseline == baseline,
            Evaluation.status == "running",
        )
    )


async def summary(*, session: AsyncSession, evaluation: Evaluation) -> EvaluationPublic:
    """The evaluation with, per version, its answers so far and its top-1 accuracy on the
    images it answered (None before any)."""
    rows = await session.execute(
        select(
            EvaluationAnswer.model_version,
            func.count(),
            func.sum(sql_cast(EvaluationAnswer.status == PredictionStatus.done.value, Integer)),
            func.sum(sql_cast(EvaluationAnswer.status.in_(_OPEN), Integer)),
            func.sum(
                case(
                    (
                        and_(
                            EvaluationAnswer.status == PredictionStatus.done.value,
                            EvaluationAnswer.label == EvaluationAnswer.truth,
                        ),
                        1,
                    ),
                    else_=0,
                )
            ),
            func.percentile_cont(0.5).within_group(EvaluationAnswer.total_ms),
        )
        .where(EvaluationAnswer.evaluation_id == evaluation.id)
        .group_by(EvaluationAnswer.model_version)
    )
    versions: dict[int, EvaluationVersion] = {}
    for version, total, answered, still_open, correct, p50 in rows:
        answered, still_open, correct = int(answered or 0), int(still_open or 0), int(correct or 0)
        versions[version] = EvaluationVersion(
            version=version,
            answered=answered,
            failed=int(total) - answered - still_open,
            pending=still_open,
            correct=correct,
            accuracy=round(correct / answered, 4) if answered else None,
            latency_p50_ms=round(float(p50), 1) if p50 is not None else None,
        )
    empty = EvaluationVersion(version=0, answered=0, failed=0, pending=0, correct=0, accuracy=None)
    remaining = max((v.answered + v.failed + v.pending for v in versions.values()), default=0)
    return EvaluationPublic(
        id=evaluation.id,
        model=evaluation.model_name,
        status=evaluation.status,
        images=remaining,
        removed=evaluation.images - remaining,
        requested_by=evaluation.requested_by,
        created_at=evaluation.created_at,
        finished_at=evaluation.finished_at,
        candidate=versions.get(evaluation.candidate, empty.model_copy(update={"version": evaluation.candidate})),
        baseline=versions.get(evaluation.baseline, empty.model_copy(update={"version": evaluation.baseline})),
    )


async def get(*, session: AsyncSession, name: str, evaluation_id: uuid.UUID) -> Evaluation | None:
    """The evaluation of model ``name`` with this id, or None."""
    return await session.scalar(select(Evaluation).where(Evaluation.id == evaluation_id, Evaluation.model_name == name))


async def listed(*, session: AsyncSession, name: str, limit: int = 20) -> list[Evaluation]:
    """The model's most recent evaluations, newest first."""
    return list(
        await session.scalars(
            select(Evaluation)
            .where(Evaluation.model_name == name)
            .order_by(Evaluation.created_at.desc(), Evaluation.id)
            .limit(limit)
        )
    )


async def latest_finished(*, session: AsyncSession, name: str, candidate: int, baseline: int) -> Evaluation | None:
    """The most recent finished evaluation of this pair of versions, or None."""
    return await session.scalar(
        select(Evaluation)
        .where(
            Evaluation.model_name == name,
            Evaluation.candidate == candidate,
            Evaluation.baseline == baseline,
            Evaluation.status == "done",
        )
        .order_by(Evaluation.created_at.desc())
        .limit(1)
    )
