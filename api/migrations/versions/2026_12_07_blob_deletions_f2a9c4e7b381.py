"""blob_deletions: the blobs whose last upload was deleted, queued in the same transaction and
removed once their file is gone, so a file a deletion could not reach (the process stopped, the
disk or the database failing after the commit) is deleted later rather than left on disk

Revision ID: f2a9c4e7b381
Revises: e4b7c2a9d513
Create Date: 2026-12-07 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f2a9c4e7b381"
down_revision: str | None = "e4b7c2a9d513"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "blob_deletions",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blob_deletions")),
    )


def downgrade() -> None:
    op.drop_table("blob_deletions")
