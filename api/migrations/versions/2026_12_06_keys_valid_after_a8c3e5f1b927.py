"""users.keys_valid_after: API keys made before an account's deactivation stay void when it is
reactivated, as its login sessions do

Revision ID: a8c3e5f1b927
Revises: d7b2e4a9c615
Create Date: 2026-12-06 18:00:00.000000+00:00

NULL (every account never deactivated since) keeps every key as it was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a8c3e5f1b927"
down_revision: str | None = "d7b2e4a9c615"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("keys_valid_after", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "keys_valid_after")
