"""revoked tokens

Revision ID: 3f8a6c2e1d57
Revises: 7c1e5a9d2b40
Create Date: 2026-11-24 00:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f8a6c2e1d57"
down_revision: str | None = "7c1e5a9d2b40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Revocations move here from Redis keys: they survive the loss of Redis's data, and the query
    # that loads a token's user checks them. Tokens signed out before this upgrade are forgotten
    # (they stay valid until they expire, ACCESS_TOKEN_EXPIRE_MINUTES at most).
    op.create_table(
        "revoked_tokens",
        sa.Column("jti", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("jti", name=op.f("pk_revoked_tokens")),
    )
    op.create_index(op.f("ix_revoked_tokens_expires_at"), "revoked_tokens", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_revoked_tokens_expires_at"), table_name="revoked_tokens")
    op.drop_table("revoked_tokens")
