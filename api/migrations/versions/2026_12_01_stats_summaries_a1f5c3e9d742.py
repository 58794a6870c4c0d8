"""stats from summaries: daily counts and latency histograms per model version, verdict counts,
feedback that names the model it judges, and the indexes keyset paging reads

Revision ID: a1f5c3e9d742
Revises: c4d9e2a7f813
Create Date: 2026-12-01 17:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a1f5c3e9d742"
down_revision: str | None = "c4d9e2a7f813"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Kept in step with api.app.stats.models.LATENCY_* (a test compares them).
LATENCY_BUCKET = """
CREATE FUNCTION latency_bucket(status text, cached boolean, total_ms double precision) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN status = 'done' AND NOT coalesce(cached, false) AND total_ms IS NOT NULL
        THEN least(greatest(floor(8 * ln(greatest(total_ms, 0.1) / 0.1) / ln(2)), 0), 199)::smallint
        ELSE -1::smallint
    END
$$
"""

# Statement-level triggers with transition tables: one INSERT of a few aggregated rows per
# statement, into a table without keys, so writers never wait on each other's counter rows.
PREDICTION_DELTAS = """
CREATE FUNCTION prediction_stat_deltas_from() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO prediction_stat_deltas (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, status,
               latency_bucket(status, cached, total_ms), count(*)
        FROM new_rows GROUP BY 1, 2, 3, 4, 5;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO prediction_stat_deltas (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, status,
               latency_bucket(status, cached, total_ms), -count(*)
        FROM old_rows GROUP BY 1, 2, 3, 4, 5;
    ELSE
        INSERT INTO prediction_stat_deltas (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT day, model_name, model_version, status, bucket, sum(n) FROM (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version, status,
                   latency_bucket(status, cached, total_ms) AS bucket, 1 AS n FROM new_rows
            UNION ALL
            SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, status,
                   latency_bucket(status, cached, total_ms), -1 FROM old_rows
        ) changed
        GROUP BY 1, 2, 3, 4, 5 HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""

VERDICT_DELTAS = """
CREATE FUNCTION verdict_stat_deltas_from() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO verdict_stat_deltas (day, model_name, model_version, is_correct, predicted_label, correct_label, verdicts)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, is_correct,
               coalesce(predicted_label, ''), coalesce(correct_label, ''), count(*)
        FROM new_rows WHERE model_name IS NOT NULL AND is_correct IS NOT NULL GROUP BY 1, 2, 3, 4, 5, 6;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO verdict_stat_deltas (day, model_name, model_version, is_correct, predicted_label, correct_label, verdicts)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, is_correct,
               coalesce(predicted_label, ''), coalesce(correct_label, ''), -count(*)
        FROM old_rows WHERE model_name IS NOT NULL AND is_correct IS NOT NULL GROUP BY 1, 2, 3, 4, 5, 6;
    ELSE
        INSERT INTO verdict_stat_deltas (day, model_name, model_version, is_correct, predicted_label, correct_label, verdicts)
        SELECT day, model_name, model_version, is_correct, predicted_label, correct_label, sum(n) FROM (
            SELECT (created_at AT TIME ZONE 'UTC')::date AS day, model_name, model_version, is_correct,
                   coalesce(predicted_label, '') AS predicted_label, coalesce(correct_label, '') AS correct_label,
                   1 AS n
            FROM new_rows WHERE model_name IS NOT NULL AND is_correct IS NOT NULL
            UNION ALL
            SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, is_correct,
                   coalesce(predicted_label, ''), coalesce(correct_label, ''), -1
            FROM old_rows WHERE model_name IS NOT NULL AND is_correct IS NOT NULL
        ) changed
        GROUP BY 1, 2, 3, 4, 5, 6 HAVING sum(n) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""


def _triggers(table: str, function: str) -> None:
    op.execute(
        f"CREATE TRIGGER {table}_stats_insert AFTER INSERT ON {table} REFERENCING NEW TABLE AS new_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    )
    op.execute(
        f"CREATE TRIGGER {table}_stats_update AFTER UPDATE ON {table} "
        f"REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    )
    op.execute(
        f"CREATE TRIGGER {table}_stats_delete AFTER DELETE ON {table} REFERENCING OLD TABLE AS old_rows "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
    )


def _prediction_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("latency_bucket", sa.SmallInteger(), nullable=False),
        sa.Column("predictions", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "prediction_stats",
        *_prediction_columns(),
        sa.PrimaryKeyConstraint("day", "model_name", "model_version", "status", "latency_bucket"),
    )
    op.create_table("prediction_stat_deltas", *_prediction_columns())
    # The same counts without the latency buckets: what the counts per day read (a day of one
    # version is a handful of rows here, dozens in prediction_stats).
    op.create_table(
        "prediction_counts",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("predictions", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model_name", "model_version", "status"),
    )
    op.create_table(
        "verdict_stats",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("is_correct", sa.Boolean(), nullable=False),
        sa.Column("verdicts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "model_name", "model_version", "is_correct"),
    )
    op.create_table(
        "correction_stats",
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("predicted_label", sa.String(200), nullable=False),
        sa.Column("correct_label", sa.String(200), nullable=False),
        sa.Column("verdicts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("model_name", "model_version", "predicted_label", "correct_label"),
    )
    # The most corrected pairs are read by this index, not by sorting every pair.
    op.create_index("ix_correction_stats_verdicts", "correction_stats", [sa.text("verdicts DESC")])
    op.create_table(
        "verdict_stat_deltas",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("is_correct", sa.Boolean(), nullable=False),
        sa.Column("predicted_label", sa.String(200), nullable=False),
        sa.Column("correct_label", sa.String(200), nullable=False),
        sa.Column("verdicts", sa.BigInteger(), nullable=False),
    )

    # A verdict names the model version it judges and what it said, so accuracy needs no join.
    op.add_column("feedback", sa.Column("model_name", sa.String(64), nullable=True))
    op.add_column("feedback", sa.Column("model_version", sa.Integer(), nullable=True))
    op.add_column("feedback", sa.Column("predicted_label", sa.String(200), nullable=True))
    op.execute("""
        UPDATE feedback f SET model_name = p.model_name, model_version = p.model_version, predicted_label = p.label
        FROM predictions p WHERE f.prediction_id = p.id
        """)

    op.execute(LATENCY_BUCKET)
    op.execute(PREDICTION_DELTAS)
    op.execute(VERDICT_DELTAS)
    # Writers of predictions wait from here until the migration commits (as CREATE TRIGGER below
    # would make them anyway): an answer stored by a running process between this count and the
    # trigger would otherwise be in neither. (feedback is locked already, by ADD COLUMN.)
    op.execute("LOCK TABLE predictions IN SHARE ROW EXCLUSIVE MODE")
    # The history so far, counted once; from here on the triggers keep the summaries.
    op.execute("""
        INSERT INTO prediction_stats (day, model_name, model_version, status, latency_bucket, predictions)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, status,
               latency_bucket(status, cached, total_ms), count(*)
        FROM predictions GROUP BY 1, 2, 3, 4, 5
        """)
    op.execute("""
        INSERT INTO prediction_counts (day, model_name, model_version, status, predictions)
        SELECT day, model_name, model_version, status, sum(predictions) FROM prediction_stats GROUP BY 1, 2, 3, 4
        """)
    op.execute("""
        INSERT INTO verdict_stats (day, model_name, model_version, is_correct, verdicts)
        SELECT (created_at AT TIME ZONE 'UTC')::date, model_name, model_version, is_correct, count(*)
        FROM feedback WHERE model_name IS NOT NULL AND is_correct IS NOT NULL GROUP BY 1, 2, 3, 4
        """)
    op.execute("""
        INSERT INTO correction_stats (model_name, model_version, predicted_label, correct_label, verdicts)
        SELECT model_name, model_version, coalesce(predicted_label, ''), coalesce(correct_label, ''), count(*)
        FROM feedback WHERE model_name IS NOT NULL AND is_correct = false GROUP BY 1, 2, 3, 4
        """)
    _triggers("predictions", "prediction_stat_deltas_from")
    _triggers("feedback", "verdict_stat_deltas_from")

    # Keyset paging: a user's newest rows first, and everyone's feedback for admins.
    op.create_index("ix_images_owner_created", "images", ["owner_id", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_id", sa.text("created_at DESC"), sa.text("id DESC")])
    op.create_index(
        "ix_feedback_owner_created", "feedback", ["owner_id", sa.text("created_at DESC"), sa.text("id DESC")]
    )
    op.create_index("ix_feedback_created", "feedback", [sa.text("created_at DESC"), sa.text("id DESC")])


def downgrade() -> None:
    for table in ("predictions", "feedback"):
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_stats_{event} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS prediction_stat_deltas_from()")
    op.execute("DROP FUNCTION IF EXISTS verdict_stat_deltas_from()")
    op.execute("DROP FUNCTION IF EXISTS latency_bucket(text, boolean, double precision)")
    for index, table in (
        ("ix_images_owner_created", "images"),
        ("ix_jobs_owner_created", "jobs"),
        ("ix_feedback_owner_created", "feedback"),
        ("ix_feedback_created", "feedback"),
    ):
        op.drop_index(index, table_name=table)
    op.drop_column("feedback", "predicted_label")
    op.drop_column("feedback", "model_version")
    op.drop_column("feedback", "model_name")
    for table in (
        "verdict_stat_deltas",
        "correction_stats",
        "verdict_stats",
        "prediction_stat_deltas",
        "prediction_stats",
    ):
        op.drop_table(table)
