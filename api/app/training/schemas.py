from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from api.app.core.fields import INT32_MAX, RequestBody
from api.app.registry.schemas import Reason
from contracts.training import TrainingOptions


class TrainingRequest(RequestBody):
    """A training run to start. No other keys, as in its options: a misplaced option (``"epochs"``
    beside ``options`` rather than in it) is refused (422), not dropped for a run of minutes."""

    model: str = Field(pattern=r"^[a-z0-9_]+$", max_length=64)
    base_version: StrictInt | None = Field(default=None, ge=1, le=INT32_MAX, description="default: the stable version")
    options: TrainingOptions = TrainingOptions()
    reason: Reason


class TrainingRunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    model_name: str
    version: int
    base_version: int
    status: str
    trigger: str
    requested_by: str
    reason: str
    options: dict[str, Any]
    categories: list[str]
    examples: dict[str, int]
    trainer: str | None
    history: list[dict[str, float | None]]
    """Each finished epoch's numbers (``contracts.training.TrainingEvent.numbers``): None for one
    that was not finite (the training diverged)."""
    record: dict[str, Any] | None
    error: str | None
    promotion: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    """Set when an admin cancelled the run while it was running: it stops at the end of its epoch
    (or, after its last, before it is kept)."""
    epoch: int = 0
    """Epochs finished so far."""
    eta_seconds: float | None = None
    """While running: the mean epoch time times the epochs left."""

    @classmethod
    def from_row(cls, row: Any) -> TrainingRunPublic:
        run = cls.model_validate(row)
        run.epoch = len(run.history)
        epochs = int(run.options.get("epochs", 0))
        if run.status == "running" and run.history:
            per_epoch = (run.history[-1].get("seconds") or 0.0) / len(run.history)
            run.eta_seconds = round(per_epoch * max(epochs - len(run.history), 0), 1)
        return run


class TrainingRecordPublic(BaseModel):
    """How a version was trained: ``record`` is its ``metrics.json`` (options, data per class,
    loss and accuracy per epoch, per-class precision/recall/F1, macro-F1, confusion matrix,
    duration, machine). ``source`` says where it comes from: the training ``run`` that made the
    version, or the file beside a version trained before runs existed (``run`` is then None)."""

    model_name: str
    version: int
    source: Literal["run", "metrics.json"]
    run: TrainingRunPublic | None
    record: dict[str, Any]


class TrainingRunsPublic(BaseModel):
    data: list[TrainingRunPublic]
    count: int
    """Every run the listing covers (of the model asked for), not only this page's."""
