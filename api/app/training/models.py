from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, new_uuid


class TrainingRun(TimestampMixin, Base):
    """One training of a new version of a model, from request to the version it registered."""

    __tablename__ = "training_runs"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    """The version it trains (registered in shadow when it ends well)."""
    base_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    """queued, running, done, failed or cancelled."""
    trigger: Mapped[str] = mapped_column(String(16))
    """``admin`` or ``auto`` (enough new labelled examples)."""
    requested_by: Mapped[str] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(Text)
    options: Mapped[dict[str, Any]] = mapped_column(JSONB)
    categories: Mapped[list[str]] = mapped_column(JSONB)
    examples: Mapped[dict[str, int]] = mapped_column(JSONB, default=dict)
    """Users' labelled examples exported for it, by split."""
    trainer: Mapped[str | None] = mapped_column(String(200))
    history: Mapped[list[dict[str, float | None]]] = mapped_column(JSONB, default=list)
    """Each finished epoch's numbers (epoch, loss, accuracy, val_loss, val_accuracy, seconds)."""
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """How far the epoch after the finished ones is, as the trainer last reported it (every few
    seconds): epoch (1-based), step, steps (in an epoch) and seconds since the training began; None
    before its first report and once that epoch finished."""
    record: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """The training record (``metrics.json``) when done."""
    error: Mapped[str | None] = mapped_column(Text)
    promotion: Mapped[str | None] = mapped_column(Text)
    """What the auto-promote rule decided once the version was served: ``promoted: ...`` or
    ``not promoted: ...`` with the comparison's numbers; None until then or with the rule off."""
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When an admin cancelled the run while it was running; the trainer stops it within seconds,
    part-way through its epoch (or, after its last, before it is kept)."""
