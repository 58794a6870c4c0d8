from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Integer, String
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
    reference_count: Mapped[int] = mapped_column(Integer)
    window_count: Mapped[int] = mapped_column(Integer)
    bins: Mapped[list[dict[str, Any]]] = mapped_column(JSONB)
    """[{"label": ..., "reference": share, "window": share}, ...] in bin order."""
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
