from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class DriftBin(BaseModel):
    label: str
    reference: float = Field(description="Share of the reference window in this bin (0 to 1)")
    window: float = Field(description="Share of the recent window in this bin (0 to 1)")


class DriftSignalOut(BaseModel):
    signal: str
    psi: float | None = Field(
        description="Population stability index: < 0.1 stable, 0.1-0.25 watch, >= 0.25 drift; "
        "null where the signal has too few values to be compared (see reason)"
    )
    status: str = Field(description="stable, watch or drift; not compared where psi is null")
    reference_count: int = Field(description="Values of this signal in the reference window")
    window_count: int = Field(
        description="Values of this signal in the recent window (pictures stored before their pixel "
        "statistics were taken have no brightness, contrast nor colour)"
    )
    reason: str | None = Field(
        default=None,
        description='Why psi is null, e.g. "reference holds 3 values; at least 100 needed"; null where it is not',
    )
    bins: list[DriftBin] = Field(description="Both distributions, lowest bin first; empty where psi is null")


class DriftVersion(BaseModel):
    model: str
    version: int
    reference_count: int = Field(description="Predictions in the reference window")
    window_count: int = Field(description="Predictions in the recent window")
    computed_at: datetime
    age_seconds: float = Field(
        description="Seconds since computed_at: far past DRIFT_INTERVAL_SECONDS, the computation has stalled"
    )
    max_psi: float | None = Field(description="The largest signal's psi; null where no signal has one")
    status: str = Field(description="The status of max_psi; not compared where it is null")
    signals: list[DriftSignalOut]


class DriftReport(BaseModel):
    """The latest drift indices per model version (versions without both windows in full are absent)."""

    reference_size: int
    window_size: int
    min_values: int = Field(
        description="Values a signal needs in each window to be compared (20 per bin, DRIFT_BINS bins): "
        "fewer give a PSI made of sampling noise"
    )
    watch_threshold: float
    alert_threshold: float
    versions: list[DriftVersion]
