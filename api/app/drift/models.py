from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Integer, String, Uuid
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base


class DriftSignal(Base):
    """The latest drift index of one signal of one model version: its window of recent answered
    predictions against its reference window (its first ones), with both distributions."""

    __tablename__ = "drift_signals"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    signal: Mapped[str] = mapped_column(String(32), primary_key=True)
    psi: Mapped[float] = mapped_column(Float)
    """NaN where reference or window holds too few of the signal's values to compare them
    (``service.min_values``)."""
    reference_count: Mapped[int] = mapped_column(Integer)
    window_count: Mapped[int] = mapped_column(Integer)
    """The signal's values in each window: fewer than its predictions where pictures have none
    (uploads stored before their pixel statistics were taken)."""
    bins: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    """[{"label": ..., "reference": share, "window": share}, ...] in bin order; [] where psi is NaN."""
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class DriftReference(Base):
    """A version's reference window as it was once full: its first DRIFT_REFERENCE_SIZE answered
    predictions' signal values, kept so that uploads deleted later do not move it (nor the start
    of the window, which follows its last prediction)."""

    __tablename__ = "drift_references"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    rows: Mapped[list[list[Any]]] = mapped_column(JSONB)
    """Per prediction: score, label, brightness, contrast, colourfulness, width, height, bytes."""
    last_created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    """The last reference prediction's (created_at, id): the window holds answers after it."""
    frozen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
