"""labelled examples

Revision ID: 4e7a9c3b2d15
Revises: 9b4d2f7a1c08
Create Date: 2026-12-01 05:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4e7a9c3b2d15"
down_revision: str | None = "9b4d2f7a1c08"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Users' labels become training data, each image split into train or test once (api.prestart
    # fills it from the verdicts given before).
    op.create_table(
        "labelled_examples",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("feedback_id", sa.Uuid(), nullable=True),
        sa.Column("image_id", sa.Uuid(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256", "model_name"),
    )
    op.create_index(op.f("ix_labelled_examples_feedback_id"), "labelled_examples", ["feedback_id"], unique=False)
    op.create_index(op.f("ix_labelled_examples_image_id"), "labelled_examples", ["image_id"], unique=False)
    op.create_index(op.f("ix_labelled_examples_owner_id"), "labelled_examples", ["owner_id"], unique=False)
    op.create_index(
        "ix_labelled_examples_model_split", "labelled_examples", ["model_name", "split", "updated_at"], unique=False
    )

    op.add_column("images", sa.Column("ground_truth", sa.String(length=200), nullable=True))


def downgrade() -> None:
    op.drop_column("images", "ground_truth")
    op.drop_table("labelled_examples")
