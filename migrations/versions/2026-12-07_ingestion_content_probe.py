"""ingestion: a cheap content probe per import, so a new file's import need not wait for its hash

Revision ID: 0011_ingestion_content_probe
Revises: 0010_loyalty_indexes
Create Date: 2026-12-07 02:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_ingestion_content_probe"
down_revision: str | None = "0010_loyalty_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column(
        "ingestion_import", sa.Column("content_probe", sa.String(length=64), nullable=True)
    )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("ingestion_import") as batch:
        batch.drop_column("content_probe")
