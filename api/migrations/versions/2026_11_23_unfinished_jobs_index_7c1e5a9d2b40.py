"""unfinished jobs index

Revision ID: 7c1e5a9d2b40
Revises: 52321b966933
Create Date: 2026-11-23 11:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7c1e5a9d2b40"
down_revision: str | None = "52321b966933"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNFINISHED = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    # Counting a user's unfinished jobs read every job of that user and every unfinished job
    # (a BitmapAnd of two indexes); this index holds only unfinished jobs, so the count and the
    # expiry scan stay as cheap as the work in flight, however long the history.
    op.create_index("ix_jobs_unfinished_owner_id", "jobs", ["owner_id"], postgresql_where=UNFINISHED)
    op.drop_index("ix_jobs_status", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_status", "jobs", ["status"], unique=False)
    op.drop_index("ix_jobs_unfinished_owner_id", table_name="jobs", postgresql_where=UNFINISHED)
