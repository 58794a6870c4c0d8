"""ix_batches_receiving: the lane's look for batches left receiving reads only those

Revision ID: f6b2d8e4a170
Revises: e1a7c4f9b352
Create Date: 2026-12-04 18:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f6b2d8e4a170"
down_revision: str | None = "e1a7c4f9b352"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_batches_receiving", "batches", ["created_at"], postgresql_where=sa.text("status = 'receiving'"))


def downgrade() -> None:
    op.drop_index("ix_batches_receiving", table_name="batches")
