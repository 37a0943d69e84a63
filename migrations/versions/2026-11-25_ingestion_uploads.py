"""ingestion: import records as jobs (rows total, the uploaded file awaiting import)

Revision ID: 0007_ingestion_uploads
Revises: 0006_segments
Create Date: 2026-11-25 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_ingestion_uploads"
down_revision: str | None = "0006_segments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.add_column("ingestion_import", sa.Column("rows_total", sa.BigInteger(), nullable=True))
    op.add_column("ingestion_import", sa.Column("file_path", sa.Text(), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("ingestion_import") as batch:
        batch.drop_column("file_path")
        batch.drop_column("rows_total")
