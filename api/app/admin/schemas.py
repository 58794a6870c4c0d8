from __future__ import annotations

from datetime import date

from pydantic import BaseModel


class DailyCount(BaseModel):
    day: date
    model: str
    version: int
    predictions: int


class LatencyPercentiles(BaseModel):
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


class Stats(BaseModel):
    predictions_per_day: list[DailyCount]
    latency: list[LatencyPercentiles]
    accuracy: list[Accuracy]
    most_corrected: list[Correction]
    queue_depth: dict[str, int]
    live_workers: int
