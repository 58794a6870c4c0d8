"""batches.received_at: when a batch's request last took a file, so that the lane cancels only
the batches nothing was received for

Revision ID: d2b8e6f1a047
Revises: a4d1c7e93b26
Create Date: 2026-12-02 14:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d2b8e6f1a047"
down_revision: str | None = "a4d1c7e93b26"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("received_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("batches", "received_at")
