from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, String
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, OwnedMixin, new_uuid


class ApiKey(OwnedMixin, Base):
    """A personal access token for scripts. Only the SHA-256 of the key is kept: the key itself is
    shown once, when it is created."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("scopes <@ ARRAY['read', 'predict', 'admin']::varchar[] AND cardinality(scopes) > 0", "scopes"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_uuid)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16))
    """The key's first characters, in clear, so that a person can tell their keys apart."""
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    """Hex SHA-256 of the whole key."""
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(16)))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When a request last authenticated with the key, to the minute (see ``service.LAST_USED_EVERY``)."""
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
