from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, new_uuid

UNFINISHED = ("queued", "running")


class Export(TimestampMixin, Base):
    """One export job: a zip of what users labelled, written in the background by one API process
    at a time (the one holding its lease), then downloaded."""

    __tablename__ = "exports"
    __table_args__ = (
        # Only exports waiting or running: what every process's runner looks for each second.
        Index("ix_exports_unfinished", "created_at", postgresql_where=text("status IN ('queued', 'running')")),
        Index("ix_exports_created_at", "created_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(16))
    """``feedback``: the labelled images and feedback.csv."""
    model: Mapped[str | None] = mapped_column(String(64))
    """Only this model's verdicts; None: every model."""
    version: Mapped[int | None] = mapped_column(Integer)
    """Only this version of ``model``."""
    since_last: Mapped[bool] = mapped_column(Boolean, default=False)
    """Incremental: only verdicts given after the last finished export of the same kind, model and version."""
    status: Mapped[str] = mapped_column(String(16))
    """``queued``, ``running``, then ``done``, ``failed`` or ``cancelled``."""
    since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Verdicts given after this only (an incremental export with an earlier one to follow)."""
    until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Verdicts given up to this only: when the export started (the next incremental one's ``since``)."""
    rows_total: Mapped[int] = mapped_column(Integer, default=0)
    """Images and models to go through (known once running)."""
    rows_done: Mapped[int] = mapped_column(Integer, default=0)
    bytes_written: Mapped[int] = mapped_column(BigInteger, default=0)
    """Size of the zip so far, in bytes."""
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """Written, by model, superseded, unlabelled and missing (ExportSummary), as it goes."""
    error: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(320))
    path: Mapped[str | None] = mapped_column(String(255))
    """The finished zip, relative to the storage directory."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a process took it up: more than one after a process died running it."""
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    """The process running it (host, pid and a random part)."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Past this without a heartbeat, its process is taken for dead and another takes it over."""
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
