"""What the operator statistics answer."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel


class DailyCount(BaseModel):
    day: date
    """A UTC day: the predictions created on it."""
    model: str
    version: int
    predictions: int
    by_status: dict[str, int] = {}
    """How many of them are in each status now (done, failed, expired, queued, ...)."""


class LatencyPercentiles(BaseModel):
    """Read from a histogram: each percentile within 4.4 % of the nearest-rank one."""

    model: str
    version: int
    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class Accuracy(BaseModel):
    model: str
    version: int
    feedback: int
    correct: int
    accuracy: float | None


class Correction(BaseModel):
    model: str
    version: int
    predicted: str | None
    corrected_to: str | None
    count: int
