"""loyalty: whether activating a programme earns on the events already loaded

Revision ID: 0012_loyalty_earn_history
Revises: 0011_ingestion_content_probe
Create Date: 2026-12-07 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_loyalty_earn_history"
down_revision: str | None = "0011_ingestion_content_probe"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision: existing programmes keep earning on history, as they did."""
    op.add_column(
        "loyalty_program",
        sa.Column("earn_history", sa.Boolean(), nullable=False, server_default=sa.true()),
    )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("loyalty_program") as batch:
        batch.drop_column("earn_history")
