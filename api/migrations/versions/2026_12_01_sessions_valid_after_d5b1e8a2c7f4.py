"""users: login sessions that began before a password change or a deactivation are refused

Revision ID: d5b1e8a2c7f4
Revises: c4a9d2e7f183
Create Date: 2026-12-01 15:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d5b1e8a2c7f4"
down_revision: str | None = "c4a9d2e7f183"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("sessions_valid_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "sessions_valid_after")
