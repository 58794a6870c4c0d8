"""model_versions.labels: each version's label list as its workers published it, kept in
PostgreSQL so that a verdict on a version no worker serves any more (retired, or its Redis key
gone) can still name the right label

Revision ID: d7b2e4a9c615
Revises: f3a7c1d9e254
Create Date: 2026-12-06 03:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "d7b2e4a9c615"
down_revision: str | None = "f3a7c1d9e254"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("labels", JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("model_versions", "labels")
