from __future__ import annotations

from pydantic import BaseModel

from api.app.stats.schemas import Accuracy, Correction, DailyCount, LatencyPercentiles


class Stats(BaseModel):
    predictions_per_day: list[DailyCount]
    latency: list[LatencyPercentiles]
    accuracy: list[Accuracy]
    most_corrected: list[Correction]
    queue_depth: dict[str, int]
    live_workers: int
