from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class DriftBin(BaseModel):
    label: str
    reference: float = Field(description="Share of the reference window in this bin (0 to 1)")
    window: float = Field(description="Share of the recent window in this bin (0 to 1)")


class DriftSignalOut(BaseModel):
    signal: str
    psi: float = Field(description="Population stability index: < 0.1 stable, 0.1-0.25 watch, >= 0.25 drift")
    status: str = Field(description="stable, watch or drift")
    bins: list[DriftBin]


class DriftVersion(BaseModel):
    model: str
    version: int
    reference_count: int
    window_count: int
    computed_at: datetime
    age_seconds: float = Field(
        description="Seconds since computed_at: far past DRIFT_INTERVAL_SECONDS, the computation has stalled"
    )
    max_psi: float
    status: str
    signals: list[DriftSignalOut]


class DriftReport(BaseModel):
    """The latest drift indices per model version (versions without both windows in full are absent)."""

    reference_size: int
    window_size: int
    watch_threshold: float
    alert_threshold: float
    versions: list[DriftVersion]
