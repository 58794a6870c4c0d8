from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, utcnow


class ModelVersion(TimestampMixin, Base):
    """One version of a model: how to load and feed it (``spec``, a ``contracts.registry.ModelEntry``
    without its name, version and state) and its live state, which operators change."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    display_name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSONB)
    channel: Mapped[str] = mapped_column(String(16))
    """stable, canary, shadow or retired (``contracts.registry.Channel``)."""
    enabled: Mapped[bool] = mapped_column(Boolean)
    weight: Mapped[int] = mapped_column(Integer)
    """Relative share of its model's traffic among the enabled versions."""
    labels: Mapped[list[str] | None] = mapped_column(JSONB, nullable=True)
    """Its label list as a worker published it (``catalog.service.remember_labels``); None until
    one did. Outlives the Redis key, which goes a while after the last worker serving it."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class RegistryChange(Base):
    """One change of the registry, for the audit trail: who, when, what and why. Its id is the
    registry's revision: the registry as of revision N is every change up to N."""

    __tablename__ = "registry_changes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    actor: Mapped[str] = mapped_column(String(320))
    """The admin's email as it was, or ``registry.yaml`` for start-up seeding: kept when the user goes."""
    action: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int | None] = mapped_column(Integer)
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    """The state of each version the change touched, by version number (as a string); None for a
    version it created."""
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    reason: Mapped[str] = mapped_column(Text, default="")
    undoes: Mapped[int | None] = mapped_column(ForeignKey("registry_changes.id"))
    """For a rollback: the promotion it undid."""
