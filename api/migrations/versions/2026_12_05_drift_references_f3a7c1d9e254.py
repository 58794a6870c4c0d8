"""drift: each version's reference kept once full, so that deleting early uploads does not move it

Revision ID: f3a7c1d9e254
Revises: e9c2f4a6b815
Create Date: 2026-12-05 20:30:00.000000+00:00

Versions without a row take their first answered predictions as before, at the next refresh.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "f3a7c1d9e254"
down_revision: str | None = "e9c2f4a6b815"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "drift_references",
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("rows", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("last_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_id", sa.Uuid(), nullable=False),
        sa.Column("frozen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version", name=op.f("pk_drift_references")),
    )


def downgrade() -> None:
    op.drop_table("drift_references")
