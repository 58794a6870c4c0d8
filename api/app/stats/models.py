"""Summaries the operator statistics read instead of the history: counts per UTC day, model
version and outcome, a latency histogram, and verdict counts.

Triggers on ``predictions`` and ``feedback`` (migration a1f5c3e9d742) append signed changes to
the ``*_deltas`` tables in the writer's own transaction; ``service.roll_up`` folds them into the
summaries. The summaries therefore always equal a count over the current rows, and no writer waits
on another's counter row.
"""

from __future__ import annotations

import math
from datetime import date

from sqlalchemy import BigInteger, Boolean, Date, Index, Integer, SmallInteger, String, text
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base

LATENCY_MIN_MS = 0.1
"""The lower edge of the first latency bucket; shorter latencies are counted in it."""
LATENCY_BUCKETS_PER_DOUBLING = 8
LATENCY_BUCKETS = 200
"""Buckets of the histogram: bucket ``b`` holds ``[0.1 · 2^(b/8), 0.1 · 2^((b+1)/8))`` ms, the
last one everything from 0.1 · 2^(199/8) ms (about 52 minutes) up."""
NO_LATENCY = -1
"""The bucket of predictions with no latency of their own: unfinished, failed, or from the cache."""
LATENCY_RELATIVE_ERROR = 2 ** (1 / (2 * LATENCY_BUCKETS_PER_DOUBLING)) - 1
"""The most a percentile read from the histogram (a bucket's geometric middle) differs from the
nearest-rank percentile of the recorded latencies, relative: 2^(1/16) - 1, about 4.4 %."""


def latency_bucket(total_ms: float) -> int:
    """The bucket of one latency (ms), as the database's ``latency_bucket()`` computes it."""
    raw = math.floor(LATENCY_BUCKETS_PER_DOUBLING * math.log2(max(total_ms, LATENCY_MIN_MS) / LATENCY_MIN_MS))
    return min(max(raw, 0), LATENCY_BUCKETS - 1)


def bucket_middle_ms(bucket: int) -> float:
    """A bucket's geometric middle (ms): the estimate of any latency in it."""
    return LATENCY_MIN_MS * 2 ** ((bucket + 0.5) / LATENCY_BUCKETS_PER_DOUBLING)


class PredictionStats(Base):
    """How many predictions created on ``day`` are in each status, with their latency bucket."""

    __tablename__ = "prediction_stats"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    latency_bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    predictions: Mapped[int] = mapped_column(BigInteger)


class PredictionLatencyMonths(Base):
    """``prediction_stats``' latency histogram per calendar month (``month``: its first day), for
    computed answers only (bucket >= 0): a long window reads whole months here and only its partial
    months from the daily rows, so its cost follows months, not days."""

    __tablename__ = "prediction_latency_months"

    month: Mapped[date] = mapped_column(Date, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    latency_bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    predictions: Mapped[int] = mapped_column(BigInteger)


class PredictionCounts(Base):
    """``prediction_stats`` without the latency buckets: predictions created on ``day`` per status."""

    __tablename__ = "prediction_counts"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    predictions: Mapped[int] = mapped_column(BigInteger)


class PredictionStatDelta(Base):
    """A change to ``prediction_stats`` and ``prediction_counts`` not folded in yet (signed)."""

    __tablename__ = "prediction_stat_deltas"
    # No key of its own: rows are appended by triggers and deleted by the roll-up. The mapper needs
    # one, so it names all columns; nothing ever loads these rows as objects.
    __mapper_args__ = {  # noqa: RUF012 - read once by the mapper
        "primary_key": ["day", "model_name", "model_version", "status", "latency_bucket"]
    }

    day: Mapped[date] = mapped_column(Date)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    latency_bucket: Mapped[int] = mapped_column(SmallInteger)
    predictions: Mapped[int] = mapped_column(BigInteger)


class VerdictStats(Base):
    """Verdicts given on ``day`` about one model version: how many said correct, how many wrong."""

    __tablename__ = "verdict_stats"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    is_correct: Mapped[bool] = mapped_column(Boolean, primary_key=True)
    verdicts: Mapped[int] = mapped_column(BigInteger)


class CorrectionStats(Base):
    """How often people said a version's ``predicted_label`` should have been ``correct_label``."""

    __tablename__ = "correction_stats"
    __table_args__ = (Index("ix_correction_stats_verdicts", text("verdicts DESC")),)

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    predicted_label: Mapped[str] = mapped_column(String(200), primary_key=True)
    correct_label: Mapped[str] = mapped_column(String(200), primary_key=True)
    verdicts: Mapped[int] = mapped_column(BigInteger)


class VerdictStatDelta(Base):
    """A change to ``verdict_stats`` and ``correction_stats`` not folded in yet (signed)."""

    __tablename__ = "verdict_stat_deltas"
    __mapper_args__ = {  # noqa: RUF012 - read once by the mapper
        "primary_key": ["day", "model_name", "model_version", "is_correct", "predicted_label", "correct_label"]
    }

    day: Mapped[date] = mapped_column(Date)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    is_correct: Mapped[bool] = mapped_column(Boolean)
    predicted_label: Mapped[str] = mapped_column(String(200))
    correct_label: Mapped[str] = mapped_column(String(200))
    verdicts: Mapped[int] = mapped_column(BigInteger)
