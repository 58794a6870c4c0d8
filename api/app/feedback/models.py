from __future__ import annotations

import uuid

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, new_uuid


class Feedback(TimestampMixin, Base):
    """A user's verdict on a prediction."""

    __tablename__ = "feedback"
    # One verdict per person and prediction (a new one replaces it); classic feedback (no
    # verdict, maybe no prediction) is kept as sent.
    __table_args__ = (
        Index(
            "uq_feedback_owner_prediction",
            "owner_id",
            "prediction_id",
            unique=True,
            postgresql_where=text("prediction_id IS NOT NULL AND is_correct IS NOT NULL"),
        ),
        # Keyset paging, newest first: a person's verdicts, and everyone's for admins.
        Index("ix_feedback_owner_created", "owner_id", text("created_at DESC"), text("id DESC")),
        Index("ix_feedback_created", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    prediction_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), index=True
    )
    is_correct: Mapped[bool | None] = mapped_column(Boolean)
    correct_label: Mapped[str | None] = mapped_column(String(200))
    comment: Mapped[str | None] = mapped_column(Text)
    # The model version judged and what it answered, copied from the prediction, so the counts of
    # verdicts per version (api.app.stats) need no join over every prediction.
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(Integer)
    predicted_label: Mapped[str | None] = mapped_column(String(200))
    # What classic clients send, kept as they sent it.
    predicted_class: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    image_file_name: Mapped[str | None] = mapped_column(String(100))
