from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from api.app.core.db import Base, OwnedMixin, TimestampMixin, new_uuid
from contracts.messages import PredictionStatus

UNFINISHED = (PredictionStatus.queued.value, PredictionStatus.running.value)
# Literal SQL rather than bound parameters: PostgreSQL uses a partial index only when a query's
# condition visibly implies the index's own, which parameters in a cached generic plan do not.
UNFINISHED_JOB = text("status IN ({})".format(", ".join(f"'{status}'" for status in UNFINISHED)))


class Job(OwnedMixin, Base):
    """One request to classify one image with one or more model versions."""

    __tablename__ = "jobs"
    # Only jobs in flight: the per-user admission count and the expiry scan read what is in
    # flight, not the whole history.
    __table_args__ = (
        Index("ix_jobs_unfinished_owner_id", "owner_id", postgresql_where=UNFINISHED_JOB),
        # Only a batch's jobs waiting for the batch lane, oldest first.
        Index("ix_jobs_pending", "created_at", postgresql_where=text("status = 'pending'")),
        # A batch's jobs waiting for the batch lane (their request id names the batch), oldest first.
        Index("ix_jobs_pending_request", "request_id", "created_at", "id", postgresql_where=text("status = 'pending'")),
        # Keyset paging of a person's jobs, newest first.
        Index("ix_jobs_owner_created", "owner_id", text("created_at DESC"), text("id DESC")),
        # One image's jobs, newest first (its detail reads 51 entries, not all of them); also
        # what deleting an image looks its jobs up by.
        Index("ix_jobs_image_created", "image_id", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str] = mapped_column(String(64), default="")
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="job", order_by="Prediction.position", lazy="selectin"
    )


class Prediction(TimestampMixin, Base):
    """One model version's answer to a job."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("job_id", "model_name", "model_version"),
        # A version's answers in time order: the drift windows (api.app.drift) read its first and
        # its latest few hundred.
        Index("ix_predictions_version_status_created", "model_name", "model_version", "status", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer, default=0)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), index=True)
    label: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    random_weights: Mapped[bool] = mapped_column(Boolean, default=False)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    preprocess_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    job: Mapped[Job] = relationship(back_populates="predictions")


class ShadowPrediction(TimestampMixin, Base):
    """A shadow version's answer to a copy of a job: kept to compare with the answer it mirrors,
    never shown to the user (no route that answers users reads this table)."""

    __tablename__ = "shadow_predictions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    shadow_of: Mapped[uuid.UUID] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    top_k: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_shadow_predictions_model", "model_name", "model_version"),
        # Only copies in flight: the expiry scan reads what is in flight, not the whole history.
        Index("ix_shadow_predictions_unfinished", "job_id", postgresql_where=UNFINISHED_JOB),
    )


class Evaluation(TimestampMixin, Base):
    """An offline evaluation: two versions of a model run on the same labelled images, so their
    accuracies compare on equal terms (not each on whatever traffic it happened to answer)."""

    __tablename__ = "evaluations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    candidate: Mapped[int] = mapped_column(Integer)
    baseline: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    """``running``, then ``done`` (every answer final: done, failed or expired)."""
    images: Mapped[int] = mapped_column(Integer)
    requested_by: Mapped[str] = mapped_column(String(320))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EvaluationAnswer(Base):
    """One version's answer to one labelled image of an evaluation. ``pending`` rows wait in
    PostgreSQL and are queued a few at a time (EVALUATION_IN_FLIGHT)."""

    __tablename__ = "evaluation_answers"
    __table_args__ = (
        Index("ix_evaluation_answers_status", "evaluation_id", "model_version", "status"),
        # Only answers in flight: the expiry scan reads what is in flight, not the whole history.
        Index("ix_evaluation_answers_unfinished", "deadline_at", postgresql_where=UNFINISHED_JOB),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    evaluation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    image_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    truth: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    label: Mapped[str | None] = mapped_column(String(200))
    score: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
