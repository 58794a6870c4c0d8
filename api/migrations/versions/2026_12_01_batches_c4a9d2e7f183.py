"""batches: many images through a lane of their own

Revision ID: c4a9d2e7f183
Revises: b3c8e1f6d920
Create Date: 2026-12-01 14:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "c4a9d2e7f183"
down_revision: str | None = "b3c8e1f6d920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("models", postgresql.JSONB(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_batches_owner_id", "batches", ["owner_id"])
    op.create_table(
        "batch_items",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("batch_id", sa.Uuid(), sa.ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("image_id", sa.Uuid(), sa.ForeignKey("images.id", ondelete="SET NULL"), nullable=True),
        sa.Column("job_id", sa.Uuid(), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_batch_items_batch_position", "batch_items", ["batch_id", "position"])
    op.create_index("ix_batch_items_job_id", "batch_items", ["job_id"])
    # A batch's jobs wait here, oldest first, until the batch lane queues them.
    op.create_index("ix_jobs_pending", "jobs", ["created_at"], postgresql_where=sa.text("status = 'pending'"))


def downgrade() -> None:
    op.drop_index("ix_jobs_pending", table_name="jobs")
    op.drop_table("batch_items")
    op.drop_table("batches")
