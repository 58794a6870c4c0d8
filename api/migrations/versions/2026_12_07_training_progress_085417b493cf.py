"""training_runs.progress: how far the epoch in progress is (epoch, step, steps, seconds), as the
trainer reports it every few seconds, so a run's progress and ETA move within an epoch

Revision ID: 085417b493cf
Revises: f2a9c4e7b381
Create Date: 2026-12-07 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "085417b493cf"
down_revision: str | None = "f2a9c4e7b381"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("training_runs", sa.Column("progress", postgresql.JSONB(astext_type=sa.Text()), nullable=True))


def downgrade() -> None:
    op.drop_column("training_runs", "progress")
