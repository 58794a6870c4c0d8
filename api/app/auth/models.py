from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base


class RevokedToken(Base):
    """A login session signed out before its tokens expired, refused until then. ``jti`` holds the
    session's id (a token's ``sid``, which is the ``jti`` of the session's first token). Kept in
    PostgreSQL: a revocation must survive the loss of Redis's data, and the query that loads a
    token's user checks it."""

    __tablename__ = "revoked_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
