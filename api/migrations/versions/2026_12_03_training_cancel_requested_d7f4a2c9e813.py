"""training_runs.cancel_requested_at: when an admin asked a running run to stop, so that the run
says so until its epoch ends

Revision ID: d7f4a2c9e813
Revises: d2b8e6f1a047
Create Date: 2026-12-03 22:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d7f4a2c9e813"
down_revision: str | None = "d2b8e6f1a047"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("training_runs", "cancel_requested_at")
