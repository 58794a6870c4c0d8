"""drift: pixel statistics of uploads, and the latest drift index per model version and signal

Revision ID: b7e2d4a9c615
Revises: a1f5c3e9d742
Create Date: 2026-12-02 10:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "b7e2d4a9c615"
down_revision: str | None = "a1f5c3e9d742"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: adding them rewrites nothing, and earlier uploads have none.
    # The drift windows read a version's first and latest answers: by this index, a few hundred
    # entries, not a sort of every answer the version gave.
    op.create_index(
        "ix_predictions_version_status_created",
        "predictions",
        ["model_name", "model_version", "status", "created_at", "id"],
    )
    op.add_column("images", sa.Column("brightness", sa.Float(), nullable=True))
    op.add_column("images", sa.Column("contrast", sa.Float(), nullable=True))
    op.add_column("images", sa.Column("colourfulness", sa.Float(), nullable=True))
    op.create_table(
        "drift_signals",
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("signal", sa.String(length=32), nullable=False),
        sa.Column("psi", sa.Float(), nullable=False),
        sa.Column("reference_count", sa.Integer(), nullable=False),
        sa.Column("window_count", sa.Integer(), nullable=False),
        sa.Column("bins", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version", "signal", name=op.f("pk_drift_signals")),
    )


def downgrade() -> None:
    op.drop_index("ix_predictions_version_status_created", table_name="predictions")
    op.drop_table("drift_signals")
    op.drop_column("images", "colourfulness")
    op.drop_column("images", "contrast")
    op.drop_column("images", "brightness")
