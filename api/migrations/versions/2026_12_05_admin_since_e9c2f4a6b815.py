"""users: when a user last became an admin, so that API keys given the admin scope before it do
not carry that scope again

Revision ID: e9c2f4a6b815
Revises: c5e8a1f3b724
Create Date: 2026-12-05 17:00:00.000000+00:00

NULL (every user until promoted again) keeps every admin key as it was.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e9c2f4a6b815"
down_revision: str | None = "c5e8a1f3b724"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("users", sa.Column("admin_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "admin_since")
