"""images: one index by owner and source, newest first, so a page of a person's batch files reads
those alone, as a page of their uploads already did (it replaces the uploads' partial index)

Revision ID: c3f8a2d6b417
Revises: a8c3e5f1b927
Create Date: 2026-12-06 20:45:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c3f8a2d6b417"
down_revision: str | None = "a8c3e5f1b927"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_images_owner_source_created",
        "images",
        ["owner_id", "source", sa.text("created_at DESC"), sa.text("id DESC")],
    )
    op.drop_index("ix_images_owner_created_uploads", table_name="images")


def downgrade() -> None:
    op.create_index(
        "ix_images_owner_created_uploads",
        "images",
        ["owner_id", sa.text("created_at DESC"), sa.text("id DESC")],
        postgresql_where=sa.text("source = 'upload'"),
    )
    op.drop_index("ix_images_owner_source_created", table_name="images")
