"""images.source: 'upload' (one person's upload) or 'batch' (a file of a batch), so a person's
history of uploads is not buried under their batches' thousands of files

Revision ID: b4d9e2f6a813
Revises: a8c3e5f7d291
Create Date: 2026-12-05 12:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b4d9e2f6a813"
down_revision: str | None = "a8c3e5f7d291"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("images", sa.Column("source", sa.String(8), server_default="upload", nullable=False))
    # An image a batch item names that was stored while its batch was received came from that
    # batch; one uploaded before and named by id (image_ids) stays an upload.
    op.execute("""
        UPDATE images SET source = 'batch'
        FROM batch_items JOIN batches ON batches.id = batch_items.batch_id
        WHERE batch_items.image_id = images.id AND images.created_at >= batches.created_at
        """)
    op.create_index(
        "ix_images_owner_created_uploads",
        "images",
        ["owner_id", sa.text("created_at DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("source = 'upload'"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_owner_created_uploads", table_name="images")
    op.drop_column("images", "source")
