"""training runs: what the auto-promote rule decided

Revision ID: b3c8e1f6d920
Revises: 7d2e5b8f4a61
Create Date: 2026-12-01 11:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3c8e1f6d920"
down_revision: str | None = "7d2e5b8f4a61"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The auto-promote rule writes its decision beside the run, so an admin sees why a candidate
    # did or did not reach users.
    op.add_column("training_runs", sa.Column("promotion", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("training_runs", "promotion")
