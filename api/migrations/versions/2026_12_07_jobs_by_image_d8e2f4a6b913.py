"""jobs: ix_jobs_image_created (image_id, created_at DESC, id DESC) in place of ix_jobs_image_id,
so an image's detail reads its newest 51 jobs instead of all of them (an image predicted 20,000
times: 80-170 ms). Deleting an image finds its jobs through it as before.

Revision ID: d8e2f4a6b913
Revises: b7d3e9a1c524
Create Date: 2026-12-07 22:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d8e2f4a6b913"
down_revision: str | None = "b7d3e9a1c524"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_jobs_image_created", "jobs", ["image_id", sa.text("created_at DESC"), sa.text("id DESC")])
    op.drop_index("ix_jobs_image_id", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_image_id", "jobs", ["image_id"], unique=False)
    op.drop_index("ix_jobs_image_created", table_name="jobs")
