from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from api.app.core.db import Base, TimestampMixin, utcnow


class Role(StrEnum):
    user = "user"
    admin = "admin"


class User(TimestampMixin, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True, index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    hashed_password: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20), default=Role.user.value)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    sessions_valid_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Login sessions that began before this (a token's ``auth_time``) are refused: set when the
    password changes or the account is deactivated, so a stolen session ends with them."""
    keys_valid_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """API keys made before this are void: set when the account is deactivated, so reactivating
    it brings none of them back (a password change leaves keys as they are)."""
    admin_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the user was last made an admin (None: never since this column exists). An API key
    with the admin scope made before it does not carry that scope: a demoted admin's keys stay
    users' keys when they are made an admin again."""

    # Not a column. A request made with an API key without the admin scope clears it on the user
    # it loaded for itself, so that every check of ``is_admin`` treats that admin as a user.
    admin_rights = True

    @property
    def is_admin(self) -> bool:
        return self.role == Role.admin.value and self.admin_rights
