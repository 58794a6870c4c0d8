"""batches.idempotency_key and request_fingerprint: a batch request sent again with the same
Idempotency-Key gets the batch it made the first time

Revision ID: e1a7c4f9b352
Revises: d7f4a2c9e813
Create Date: 2026-12-04 17:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e1a7c4f9b352"
down_revision: str | None = "d7f4a2c9e813"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("idempotency_key", sa.String(length=255), nullable=True))
    op.add_column("batches", sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
    op.create_index("uq_batches_owner_idempotency_key", "batches", ["owner_id", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_batches_owner_idempotency_key", table_name="batches")
    op.drop_column("batches", "request_fingerprint")
    op.drop_column("batches", "idempotency_key")
