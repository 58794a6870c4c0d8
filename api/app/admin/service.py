"""Operator statistics, computed in SQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.functions import WithinGroup

from api.app.admin.schemas import Accuracy, Correction, DailyCount, LatencyPercentiles
from api.app.feedback.models import Feedback
from api.app.predictions.models import Prediction
from contracts.messages import PredictionStatus


async def predictions_per_day(session: AsyncSession, days: int) -> list[DailyCount]:
    day = func.date_trunc("day", Prediction.created_at).label("day")
    rows = await session.execute(
        select(day, Prediction.model_name, Prediction.model_version, func.count())
        .where(Prediction.created_at >= datetime.now(UTC) - timedelta(days=days))
        .group_by(day, Prediction.model_name, Prediction.model_version)
        .order_by(day, Prediction.model_name, Prediction.model_version)
    )
    return [DailyCount(day=d.date(), model=m, version=v, predictions=n) for d, m, v, n in rows.tuples()]


async def latency(session: AsyncSession, days: int) -> list[LatencyPercentiles]:
    def pct(q: float) -> WithinGroup[Any]:
        return func.percentile_cont(q).within_group(Prediction.total_ms)

    rows = await session.execute(
        select(Prediction.model_name, Prediction.model_version, func.count(), pct(0.5), pct(0.95), pct(0.99))
        .where(
            Prediction.status == PredictionStatus.done.value,
            Prediction.cached.is_(False),
            Prediction.created_at >= datetime.now(UTC) - timedelta(days=days),
        )
        .group_by(Prediction.model_name, Prediction.model_version)
        .order_by(Prediction.model_name, Prediction.model_version)
    )
    return [
        LatencyPercentiles(model=m, version=v, count=n, p50_ms=a, p95_ms=b, p99_ms=c)
        for m, v, n, a, b, c in rows.tuples()
    ]


async def accuracy(session: AsyncSession) -> list[Accuracy]:
    """Share of feedback saying "correct", per model version (feedback without a verdict ignored)."""
    rows = await session.execute(
        select(
            Prediction.model_name,
            Prediction.model_version,
            func.count(Feedback.id),
            func.sum(cast(Feedback.is_correct, Integer)),
        )
        .join(Feedback, Feedback.prediction_id == Prediction.id)
        .where(Feedback.is_correct.is_not(None))
        .group_by(Prediction.model_name, Prediction.model_version)
        .order_by(Prediction.model_name, Prediction.model_version)
    )
    return [
        Accuracy(model=m, version=v, feedback=n, correct=int(c or 0), accuracy=(int(c or 0) / n) if n else None)
        for m, v, n, c in rows.tuples()
    ]


async def most_corrected(session: AsyncSession, limit: int) -> list[Correction]:
    count = func.count().label("n")
    rows = await session.execute(
        select(Prediction.model_name, Prediction.model_version, Prediction.label, Feedback.correct_label, count)
        .join(Feedback, and_(Feedback.prediction_id == Prediction.id, Feedback.is_correct.is_(False)))
        .group_by(Prediction.model_name, Prediction.model_version, Prediction.label, Feedback.correct_label)
        .order_by(count.desc())
        .limit(limit)
    )
    return [Correction(model=m, version=v, predicted=p, corrected_to=c, count=n) for m, v, p, c, n in rows.tuples()]
