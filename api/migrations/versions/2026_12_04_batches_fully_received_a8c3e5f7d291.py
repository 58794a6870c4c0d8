"""batches.fully_received: whether a batch's request stored all it sent, so that a sender can tell
a batch cut off while it was received from a finished one

Revision ID: a8c3e5f7d291
Revises: f6b2d8e4a170
Create Date: 2026-12-04 18:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a8c3e5f7d291"
down_revision: str | None = "f6b2d8e4a170"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batches from before count as received, but for those still receiving.
    op.add_column("batches", sa.Column("fully_received", sa.Boolean(), nullable=False, server_default=sa.true()))
    op.execute("UPDATE batches SET fully_received = false WHERE status = 'receiving'")
    op.alter_column("batches", "fully_received", server_default=None)


def downgrade() -> None:
    op.drop_column("batches", "fully_received")
