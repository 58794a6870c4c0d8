"""latency histograms per calendar month, so a year's percentiles read about a dozen months and
the partial months at the window's edges instead of every day

Revision ID: f3a9c2d81b57
Revises: e295543da119
Create Date: 2026-12-02 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f3a9c2d81b57"
down_revision: str | None = "e295543da119"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Only computed answers have a latency (bucket >= 0); status is not a key: a latency bucket
    # belongs to done answers alone, so the monthly rows need no per-status split.
    op.create_table(
        "prediction_latency_months",
        sa.Column("month", sa.Date(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("latency_bucket", sa.SmallInteger(), nullable=False),
        sa.Column("predictions", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("month", "model_name", "model_version", "latency_bucket"),
    )
    # The deltas not rolled up yet are folded into both tables by the next roll-up; what the
    # daily table holds now is counted here once.
    op.execute("""
        INSERT INTO prediction_latency_months (month, model_name, model_version, latency_bucket, predictions)
        SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, sum(predictions)
        FROM prediction_stats WHERE latency_bucket >= 0
        GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0
        """)


def downgrade() -> None:
    op.drop_table("prediction_latency_months")
