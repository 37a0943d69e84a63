"""loyalty: split transfers name their source entry, erasure mark, tier changes name their event,
refund lookups by (programme, order)

Revision ID: 0009_loyalty_splits_erasures
Revises: 0008_dashboards_ledger_index
Create Date: 2026-11-25 11:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_loyalty_splits_erasures"
down_revision: str | None = "0008_dashboards_ledger_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    with op.batch_alter_table("loyalty_program") as batch:
        batch.add_column(
            sa.Column("last_erasure_seq", sa.BigInteger(), server_default="0", nullable=False)
        )
    with op.batch_alter_table("loyalty_ledger_entry") as batch:
        batch.add_column(sa.Column("source_entry_id", sa.String(length=36), nullable=True))
        batch.create_index(
            batch.f("ix_loyalty_ledger_entry_source_entry_id"), ["source_entry_id"], unique=False
        )
    with op.batch_alter_table("loyalty_tier_change") as batch:
        batch.add_column(sa.Column("event_id", sa.BigInteger(), nullable=True))
    op.create_index(
        "ix_loyalty_ledger_entry_program_order",
        "loyalty_ledger_entry",
        ["program_id", "order_id"],
        unique=False,
    )
    op.create_index(
        "ix_loyalty_activity_program_order", "loyalty_activity", ["program_id", "order_id"]
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_loyalty_activity_program_order", table_name="loyalty_activity")
    op.drop_index("ix_loyalty_ledger_entry_program_order", table_name="loyalty_ledger_entry")
    with op.batch_alter_table("loyalty_tier_change") as batch:
        batch.drop_column("event_id")
    with op.batch_alter_table("loyalty_ledger_entry") as batch:
        batch.drop_index(batch.f("ix_loyalty_ledger_entry_source_entry_id"))
        batch.drop_column("source_entry_id")
    with op.batch_alter_table("loyalty_program") as batch:
        batch.drop_column("last_erasure_seq")
