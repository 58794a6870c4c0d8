from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, OwnedMixin, new_uuid


class Batch(OwnedMixin, Base):
    """A collection of images classified by the same model versions, through the batch lane."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("uq_batches_owner_idempotency_key", "owner_id", "idempotency_key", unique=True),
        Index("ix_batches_receiving", "created_at", postgresql_where=text("status = 'receiving'")),
        # The batches whose jobs the lane serves in turn: read at every look of the lane.
        Index("ix_batches_running", "created_at", postgresql_where=text("status = 'running'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    status: Mapped[str] = mapped_column(String(16))
    """``receiving`` while its request stores the files, ``running`` until every job is final, then
    ``done``; ``cancelled`` when its owner cancelled it, its request failed or its request's process
    stopped (``lane.cancel_orphaned``)."""
    models: Mapped[list[str]] = mapped_column(JSONB)
    """The model versions (``name@version``) every image goes to."""
    entries: Mapped[int] = mapped_column(Integer)
    """Files received, images and skipped ones."""
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While ``receiving``: when its request last noted that it is alive (ten times per timeout,
    however long a file takes). A batch not noted for ``BATCH_RECEIVE_TIMEOUT_SECONDS`` was left
    by a process that stopped (``lane.cancel_orphaned``)."""
    fully_received: Mapped[bool] = mapped_column(Boolean, default=False)
    """Whether its request stored every file and id it sent (it then went ``running``); False for
    a batch still ``receiving`` or cancelled before it was all received (its owner's cancel, its
    request's failure, or its process stopped), whose sender may send it again."""
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    """The ``Idempotency-Key`` header its request carried, unique per owner: the same request sent
    again with it gets this batch back instead of a second one. Released (None) when the batch is
    cancelled before it was fully received, so that sending it again makes a new one."""
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    """With a key: SHA-256 of what the request asked for (``service.request_fingerprint``), so that
    the key sent again with other files, image ids or models is refused, not answered with this batch."""


class BatchItem(Base):
    """One file of a batch: an image with its job, or a file skipped with the reason."""

    __tablename__ = "batch_items"
    __table_args__ = (Index("ix_batch_items_batch_position", "batch_id", "position"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    batch_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    file_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str | None] = mapped_column(String(64))
    image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    """Identical images of a batch share one job: they are computed once."""
    error: Mapped[str | None] = mapped_column(Text)
    """Why the file was skipped (not an image, too large, a nested archive...)."""
