"""batch turns: the indexes the batch lane reads to serve batches in turn, a batch's pending jobs
(by its request id) and the running batches, so a look costs the same however many jobs and
batches the history holds

Revision ID: b7d3e9a1c524
Revises: 085417b493cf
Create Date: 2026-12-07 12:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7d3e9a1c524"
down_revision: str | None = "085417b493cf"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status = 'pending'")
RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_index("ix_jobs_pending_request", "jobs", ["request_id", "created_at", "id"], postgresql_where=PENDING)
    op.create_index("ix_batches_running", "batches", ["created_at"], postgresql_where=RUNNING)


def downgrade() -> None:
    op.drop_index("ix_batches_running", table_name="batches", postgresql_where=RUNNING)
    op.drop_index("ix_jobs_pending_request", table_name="jobs", postgresql_where=PENDING)
