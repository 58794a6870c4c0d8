"""feedback: one verdict per person and prediction

Revision ID: e7c3a9b5d216
Revises: d5b1e8a2c7f4
Create Date: 2026-12-01 15:10:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e7c3a9b5d216"
down_revision: str | None = "d5b1e8a2c7f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A verdict given again replaced nothing before: keep each person's latest one per prediction.
    op.execute("""
        DELETE FROM feedback f USING feedback later
        WHERE f.prediction_id IS NOT NULL AND f.is_correct IS NOT NULL AND later.is_correct IS NOT NULL
          AND later.owner_id = f.owner_id AND later.prediction_id = f.prediction_id
          AND (later.created_at, later.id) > (f.created_at, f.id)
        """)
    op.create_index(
        "uq_feedback_owner_prediction",
        "feedback",
        ["owner_id", "prediction_id"],
        unique=True,
        postgresql_where=sa.text("prediction_id IS NOT NULL AND is_correct IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_feedback_owner_prediction", table_name="feedback")
