from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, new_uuid, utcnow


class LabelledExample(TimestampMixin, Base):
    """An image with the label users gave it for one model: training data. One row per image
    (by content) and model; a later label replaces the earlier one, but the split, assigned from
    the image's hash when the row is first written, never changes."""

    __tablename__ = "labelled_examples"
    __table_args__ = (
        UniqueConstraint("sha256", "model_name"),
        Index("ix_labelled_examples_model_split", "model_name", "split", "updated_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    model_name: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(8))
    """``train`` or ``test``."""
    source: Mapped[str] = mapped_column(String(16))
    """``verdict`` (a user's verdict on an answer) or ``ground_truth`` (the uploader's own label)."""
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The verdict or upload the label came from: deleting it (with its image) deletes the example.
    feedback_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("feedback.id", ondelete="CASCADE"), index=True)
    image_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
