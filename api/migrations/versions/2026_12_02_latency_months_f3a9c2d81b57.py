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


# Kept by PostgreSQL from the daily histogram itself, not by the roll-up: whatever writes
# prediction_stats (this release's roll-up, an older release's still running during an upgrade)
# moves the monthly rows with it. One ordered upsert per statement, so concurrent roll-ups lock
# the monthly rows in the same order.
MONTHS_FROM_DAYS = """
CREATE FUNCTION prediction_latency_months_from() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO prediction_latency_months AS m (month, model_name, model_version, latency_bucket, predictions)
        SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, sum(predictions)
        FROM new_rows WHERE latency_bucket >= 0
        GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (month, model_name, model_version, latency_bucket)
        DO UPDATE SET predictions = m.predictions + excluded.predictions;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO prediction_latency_months AS m (month, model_name, model_version, latency_bucket, predictions)
        SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, -sum(predictions)
        FROM old_rows WHERE latency_bucket >= 0
        GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (month, model_name, model_version, latency_bucket)
        DO UPDATE SET predictions = m.predictions + excluded.predictions;
    ELSE
        INSERT INTO prediction_latency_months AS m (month, model_name, model_version, latency_bucket, predictions)
        SELECT month, model_name, model_version, latency_bucket, sum(n) FROM (
            SELECT date_trunc('month', day)::date AS month, model_name, model_version, latency_bucket,
                   predictions AS n FROM new_rows WHERE latency_bucket >= 0
            UNION ALL
            SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, -predictions
            FROM old_rows WHERE latency_bucket >= 0
        ) changed
        GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0 ORDER BY 1, 2, 3, 4
        ON CONFLICT (month, model_name, model_version, latency_bucket)
        DO UPDATE SET predictions = m.predictions + excluded.predictions;
    END IF;
    RETURN NULL;
END
$$
"""


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
    # No roll-up may change the daily rows between the count below and the trigger.
    op.execute("LOCK TABLE prediction_stats IN SHARE ROW EXCLUSIVE MODE")
    op.execute("""
        INSERT INTO prediction_latency_months (month, model_name, model_version, latency_bucket, predictions)
        SELECT date_trunc('month', day)::date, model_name, model_version, latency_bucket, sum(predictions)
        FROM prediction_stats WHERE latency_bucket >= 0
        GROUP BY 1, 2, 3, 4 HAVING sum(predictions) <> 0
        """)
    op.execute(MONTHS_FROM_DAYS)
    op.execute(
        "CREATE TRIGGER prediction_stats_months_insert AFTER INSERT ON prediction_stats "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION prediction_latency_months_from()"
    )
    op.execute(
        "CREATE TRIGGER prediction_stats_months_update AFTER UPDATE ON prediction_stats "
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION prediction_latency_months_from()"
    )
    op.execute(
        "CREATE TRIGGER prediction_stats_months_delete AFTER DELETE ON prediction_stats "
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION prediction_latency_months_from()"
    )


def downgrade() -> None:
    op.drop_table("prediction_latency_months")
    op.execute("DROP FUNCTION prediction_latency_months_from()")
