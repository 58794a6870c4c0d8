from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, new_uuid, utcnow


class LabelledExample(TimestampMixin, Base):
    """One label a user gave an image for one model: training data. One row per verdict with a
    label and per uploader's own label (``ground_truth``) of an image; the model's example of an
    image's content is its latest row (by ``updated_at``), so deleting the upload or verdict a
    label came from leaves the labels others gave the same content. Every row of a content and
    model has the split its first row was given from the image's hash."""

    __tablename__ = "labelled_examples"
    __table_args__ = (
        Index("ix_labelled_examples_model_split", "model_name", "split", "updated_at"),
        Index("ix_labelled_examples_model_content", "model_name", "sha256", text("updated_at DESC")),
        # One row per verdict, and per uploaded image and model for its uploader's label.
        Index(
            "uq_labelled_examples_verdict",
            "feedback_id",
            unique=True,
            postgresql_where=text("feedback_id IS NOT NULL"),
        ),
        Index(
            "uq_labelled_examples_ground_truth",
            "image_id",
            "model_name",
            unique=True,
            postgresql_where=text("feedback_id IS NULL"),
        ),
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
