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
    """Set when an admin cancelled the run while it was running: the trainer stops it within
    seconds, part-way through its epoch (or, after its last, before it is kept)."""
    epoch: int = 0
    """Epochs finished so far."""
    step: int | None = None
    """Training steps (batches) done in the epoch after the finished ones (``epoch + 1``), as the
    trainer last reported them (every few seconds); None before its first report of that epoch,
    and once the run ended (a cancelled or failed run's ``error`` says where it stopped)."""
    steps: int | None = None
    """Training steps in an epoch, with ``step``."""
    eta_seconds: float | None = None
    """While running, the seconds left at the trainer's last report: ``elapsed * (1 - done) /
    done``, where ``done`` is the share of all the run's epochs trained, ``(epoch + step / steps)
    / epochs`` (the epoch in progress counted by its steps), and ``elapsed`` the seconds since the
    training began at that report (of the last epoch finished, or of the step report when it is
    later). None before the first report, while it evaluates after its last epoch, once the run
    ended, and for a run whose epochs are not known."""

    @classmethod
    def from_row(cls, row: Any) -> TrainingRunPublic:
        run = cls.model_validate(row)
        run.epoch = len(run.history)
        epochs = int(run.options.get("epochs", 0))
        progress = getattr(row, "progress", None) or {}
        # Only the epoch right after those finished (a report of an earlier one is stale), and only
        # while running: a run's end says exactly where it stopped, past its last report.
        current = int(progress.get("epoch") or 0) == run.epoch + 1 and int(progress.get("steps") or 0) > 0
        if current and run.status == "running":
            run.step, run.steps = int(progress.get("step") or 0), int(progress["steps"])
        if run.status != "running" or epochs <= 0 or run.epoch >= epochs:
            # Every epoch trained: it evaluates (30-40 s for the VGG recipe), which the formula
            # does not cover; 0 would say it is about to end.
            return run
        if run.step is not None and run.steps:
            done, elapsed = run.epoch + min(run.step / run.steps, 1.0), progress.get("seconds")
        elif run.history:
            done, elapsed = run.epoch, run.history[-1].get("seconds")
        else:
            return run
        if done > 0 and isinstance(elapsed, int | float):
            run.eta_seconds = round(max(elapsed * (epochs / done - 1), 0.0), 1)
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
