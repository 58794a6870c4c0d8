"""Operator statistics read from the summaries (api.app.stats.models), whatever the history's size."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

from pydantic import TypeAdapter
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from api.app.stats.models import (
    CorrectionStats,
    PredictionLatencyMonths,
    PredictionStats,
    VerdictStats,
    bucket_middle_ms,
)
from api.app.stats.schemas import Accuracy, Correction, DailyCount, LatencyPercentiles

DAILY_COUNTS = TypeAdapter(list[DailyCount])

ROLL_UP = text("""
    WITH moved AS (DELETE FROM prediction_stat_deltas RETURNING *),
    histogram AS (
        INSERT INTO prediction_stats AS s (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT day, model_name, model_version, status, latency_bucket, sum(predictions) FROM moved
        GROUP BY 1, 2, 3, 4, 5 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4, 5
        ON CONFLICT (day, model_name, model_version, status, latency_bucket)
        DO UPDATE SET predictions = s.predictions + excluded.predictions
    ),
    counts AS (
        INSERT INTO prediction_counts AS c (day, model_name, model_version, status, predictions)
        SELECT day, model_name, model_version, status, sum(predictions) FROM moved
        GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (day, model_name, model_version, status)
        DO UPDATE SET predictions = c.predictions + excluded.predictions
    ),
    verdicts_moved AS (DELETE FROM verdict_stat_deltas RETURNING *),
    daily_verdicts AS (
        INSERT INTO verdict_stats AS s (day, model_name, model_version, is_correct, verdicts)
        SELECT day, model_name, model_version, is_correct, sum(verdicts) FROM verdicts_moved
        GROUP BY 1, 2, 3, 4 HAVING sum(verdicts) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (day, model_name, model_version, is_correct)
        DO UPDATE SET verdicts = s.verdicts + excluded.verdicts
    )
    INSERT INTO correction_stats AS c (model_name, model_version, predicted_label, correct_label, verdicts)
    SELECT model_name, model_version, predicted_label, correct_label, sum(verdicts) FROM verdicts_moved
    WHERE NOT is_correct GROUP BY 1, 2, 3, 4 HAVING sum(verdicts) <> 0 ORDER BY 1, 2, 3, 4
    ON CONFLICT (model_name, model_version, predicted_label, correct_label)
    DO UPDATE SET verdicts = c.verdicts + excluded.verdicts
    """)
"""Both change tables folded into their summaries in one statement (one round trip). The monthly
latency histogram follows ``prediction_stats`` by a trigger of its own (migration f3a9c2d81b57)."""


async def roll_up(*, session: AsyncSession) -> None:
    """Folds the changes the triggers recorded into the summaries, each change exactly once (a
    change is deleted in the statement that adds it; a concurrent roll-up skips what this one took).
    Commits."""
    await session.execute(ROLL_UP)
    await session.commit()


SUMMARIES = ("prediction_stats", "prediction_counts", "prediction_latency_months", "verdict_stats", "correction_stats")


async def vacuum_changes(*, session: AsyncSession) -> None:
    """VACUUMs the change tables, which every prediction writes to and every roll-up empties:
    their dead rows would otherwise pile up with the history wherever autovacuum is off or slow.
    Also VACUUMs and ANALYZEs the summaries, which grow a day at a time: without fresh statistics
    the planner reads a whole summary table for a one-day window. Runs outside a transaction
    (VACUUM refuses one); skips a table another session holds."""
    connection = await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    await connection.execute(text("VACUUM (SKIP_LOCKED) prediction_stat_deltas, verdict_stat_deltas"))
    await connection.execute(text(f"VACUUM (SKIP_LOCKED, ANALYZE) {', '.join(SUMMARIES)}"))


def first_day(days: int, today: date | None = None) -> date:
    """The first UTC day of a window of ``days`` days that ends today (inclusive)."""
    return (today or datetime.now(UTC).date()) - timedelta(days=days - 1)


PREDICTIONS_PER_DAY = text("""
    SELECT day, model_name, model_version, array_agg(status), array_agg(predictions)
    FROM prediction_counts WHERE day >= :first_day AND predictions <> 0
    GROUP BY day, model_name, model_version ORDER BY day, model_name, model_version
    """)


async def predictions_per_day(*, session: AsyncSession, days: int) -> list[DailyCount]:
    """Predictions created on each of the last ``days`` UTC days, per model version, with their
    counts by status; reads at most days × versions × statuses summary rows, grouped by
    PostgreSQL and validated in one call of pydantic's core (a year is over a thousand entries)."""
    rows = await session.execute(PREDICTIONS_PER_DAY, {"first_day": first_day(days)})
    return DAILY_COUNTS.validate_python(
        [
            {
                "day": day,
                "model": model,
                "version": version,
                "predictions": sum(counts),
                "by_status": dict(sorted(zip(statuses, counts, strict=True))),
            }
            for day, model, version, statuses, counts in rows
        ]
    )


def percentiles(histogram: dict[int, int], quantiles: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles (ms) of a latency histogram ``{bucket: count}``: for each ``q``,
    the middle of the bucket that holds the ``ceil(q·n)``-th smallest latency, within
    ``LATENCY_RELATIVE_ERROR`` (4.4 %) of it; None for an empty histogram."""
    total = sum(histogram.values())
    if total <= 0:
        return [None for _ in quantiles]
    answers: list[float | None] = []
    for q in quantiles:
        rank = max(1, math.ceil(q * total))
        seen = 0
        for bucket in sorted(histogram):
            seen += histogram[bucket]
            if seen >= rank:
                answers.append(round(bucket_middle_ms(bucket), 3))
                break
    return answers


def whole_months(start: date, today: date) -> tuple[date, date] | None:
    """The calendar months wholly inside ``[start, today]`` that have ended, as the first day of
    the first one and the first day of the month after the last one; None when there are none."""
    first = start if start.day == 1 else (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    end = today.replace(day=1)
    return (first, end) if first < end else None


async def latency(*, session: AsyncSession, days: int) -> list[LatencyPercentiles]:
    """p50, p95 and p99 of the total latency (ms) of the answers computed (not from the cache)
    in the last ``days`` UTC days, per model version, from the histogram (see ``percentiles``).

    Ended calendar months inside the window are read from the monthly histogram, the days before
    and after them from the daily one: a year reads at most about 12 × versions × buckets monthly
    rows and 60 days' daily rows."""
    today = datetime.now(UTC).date()
    start = first_day(days, today)
    months = whole_months(start, today)
    daily = select(
        PredictionStats.model_name.label("model_name"),
        PredictionStats.model_version.label("model_version"),
        PredictionStats.latency_bucket.label("latency_bucket"),
        PredictionStats.predictions.label("predictions"),
    ).where(PredictionStats.day >= start, PredictionStats.latency_bucket >= 0)
    if months is not None:
        daily = daily.where((PredictionStats.day < months[0]) | (PredictionStats.day >= months[1]))
        monthly = select(
            PredictionLatencyMonths.model_name,
            PredictionLatencyMonths.model_version,
            PredictionLatencyMonths.latency_bucket,
            PredictionLatencyMonths.predictions,
        ).where(PredictionLatencyMonths.month >= months[0], PredictionLatencyMonths.month < months[1])
        parts = daily.union_all(monthly).subquery()
    else:
        parts = daily.subquery()
    rows = await session.execute(
        select(
            parts.c.model_name, parts.c.model_version, parts.c.latency_bucket, func.sum(parts.c.predictions)
        ).group_by(parts.c.model_name, parts.c.model_version, parts.c.latency_bucket)
    )
    histograms: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)
    for model, version, bucket, n in rows:
        if n:
            histograms[(model, version)][int(bucket)] = int(n)
    answers = []
    for (model, version), histogram in sorted(histograms.items()):
        p50, p95, p99 = percentiles(histogram, (0.5, 0.95, 0.99))
        answers.append(
            LatencyPercentiles(
                model=model, version=version, count=sum(histogram.values()), p50_ms=p50, p95_ms=p95, p99_ms=p99
            )
        )
    return answers


async def accuracy(*, session: AsyncSession) -> list[Accuracy]:
    """Share of verdicts saying "correct", per model version, over all time."""
    rows = await session.execute(
        select(
            VerdictStats.model_name,
            VerdictStats.model_version,
            VerdictStats.is_correct,
            func.sum(VerdictStats.verdicts),
        ).group_by(VerdictStats.model_name, VerdictStats.model_version, VerdictStats.is_correct)
    )
    counts: dict[tuple[str, int], dict[bool, int]] = defaultdict(dict)
    for model, version, is_correct, n in rows:
        counts[(model, version)][bool(is_correct)] = int(n or 0)
    answers = []
    for (model, version), verdicts in sorted(counts.items()):
        total, correct = sum(verdicts.values()), verdicts.get(True, 0)
        if total > 0:
            answers.append(
                Accuracy(model=model, version=version, feedback=total, correct=correct, accuracy=correct / total)
            )
    return answers


async def most_corrected(*, session: AsyncSession, limit: int) -> list[Correction]:
    """The ``limit`` (predicted, corrected to) pairs people gave most often, by the summary's index."""
    rows = await session.execute(
        select(
            CorrectionStats.model_name,
            CorrectionStats.model_version,
            CorrectionStats.predicted_label,
            CorrectionStats.correct_label,
            CorrectionStats.verdicts,
        )
        .where(CorrectionStats.verdicts > 0)
        # Ties in a fixed order, so the list does not reshuffle from one read to the next.
        .order_by(
            CorrectionStats.verdicts.desc(),
            CorrectionStats.model_name,
            CorrectionStats.model_version,
            CorrectionStats.predicted_label,
            CorrectionStats.correct_label,
        )
        .limit(limit)
    )
    return [
        Correction(model=m, version=v, predicted=p or None, corrected_to=c or None, count=int(n))
        for m, v, p, c, n in rows
    ]
