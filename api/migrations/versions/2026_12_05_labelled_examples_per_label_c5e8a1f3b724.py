"""labelled_examples: one row per label (a verdict, or an uploader's label of an image and model)
instead of one per content and model, so deleting the upload or verdict a label came from leaves
the labels others gave the same content; a verdict whose label was taken back has no row

Uploaders' labels that a later label had replaced are not brought back: the image keeps its label,
but not which of its request's models it was given for. API processes of the previous release
write labels against the dropped constraint (500) until they are replaced.

Revision ID: c5e8a1f3b724
Revises: b4d9e2f6a813
Create Date: 2026-12-05 15:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from api.app.core.config import get_settings

revision: str = "c5e8a1f3b724"
down_revision: str | None = "b4d9e2f6a813"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("uq_labelled_examples_sha256", "labelled_examples", type_="unique")
    op.create_index(
        "ix_labelled_examples_model_content",
        "labelled_examples",
        ["model_name", "sha256", sa.text("updated_at DESC")],
    )
    op.create_index(
        "uq_labelled_examples_verdict",
        "labelled_examples",
        ["feedback_id"],
        unique=True,
        postgresql_where=sa.text("feedback_id IS NOT NULL"),
    )
    op.create_index(
        "uq_labelled_examples_ground_truth",
        "labelled_examples",
        ["image_id", "model_name"],
        unique=True,
        postgresql_where=sa.text("feedback_id IS NULL"),
    )
    # A verdict changed to "wrong" without the right label kept the label it had taken back.
    op.execute("""
        DELETE FROM labelled_examples e USING feedback f
        WHERE e.feedback_id = f.id AND f.correct_label IS NULL
        """)
    # Every labelled verdict gets its row: those a later label had replaced come back, with the
    # split of their content's row, or else from the hash as ``examples.split_of`` assigns it
    # (its first 64 bits, compared as unsigned numbers with the share's fraction of 2**64).
    threshold = format(min(int(get_settings().feedback_test_share * 2**64), 2**64 - 1), "064b")
    op.execute(f"""
        INSERT INTO labelled_examples
            (id, model_name, sha256, label, split, source, owner_id, feedback_id, image_id, created_at, updated_at)
        SELECT gen_random_uuid(), p.model_name, i.sha256, f.correct_label,
            COALESCE(
                (SELECT e.split FROM labelled_examples e
                 WHERE e.sha256 = i.sha256 AND e.model_name = p.model_name LIMIT 1),
                CASE WHEN ('x' || substr(i.sha256, 1, 16))::bit(64) < B'{threshold}' THEN 'test' ELSE 'train' END
            ),
            'verdict', f.owner_id, f.id, NULL, f.created_at, f.created_at
        FROM feedback f
        JOIN predictions p ON p.id = f.prediction_id
        JOIN jobs j ON j.id = p.job_id
        JOIN images i ON i.id = j.image_id
        WHERE f.correct_label IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM labelled_examples e WHERE e.feedback_id = f.id)
        """)


def downgrade() -> None:
    # Back to one row per content and model: the latest of each.
    op.execute("""
        DELETE FROM labelled_examples e USING labelled_examples later
        WHERE later.sha256 = e.sha256 AND later.model_name = e.model_name
          AND (later.updated_at, later.id) > (e.updated_at, e.id)
        """)
    op.drop_index("uq_labelled_examples_ground_truth", table_name="labelled_examples")
    op.drop_index("uq_labelled_examples_verdict", table_name="labelled_examples")
    op.drop_index("ix_labelled_examples_model_content", table_name="labelled_examples")
    op.create_unique_constraint("uq_labelled_examples_sha256", "labelled_examples", ["sha256", "model_name"])
