"""loyalty: drop the ledger and activity indexes no query needs (each entry written one
B-tree less): programme (a prefix of (programme, order)), order alone, and the source entry
index made partial (only split transfers have one)

Revision ID: 0010_loyalty_indexes
Revises: 0009_loyalty_splits_erasures
Create Date: 2026-11-25 17:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_loyalty_indexes"
down_revision: str | None = "0009_loyalty_splits_erasures"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SOURCE_ENTRY = "ix_loyalty_ledger_entry_source_entry_id"


def upgrade() -> None:
    """Apply this revision."""
    op.drop_index("ix_loyalty_ledger_entry_program_id", table_name="loyalty_ledger_entry")
    op.drop_index("ix_loyalty_ledger_entry_order_id", table_name="loyalty_ledger_entry")
    op.drop_index(SOURCE_ENTRY, table_name="loyalty_ledger_entry")
    op.create_index(
        SOURCE_ENTRY,
        "loyalty_ledger_entry",
        ["source_entry_id"],
        sqlite_where=sa.text("source_entry_id IS NOT NULL"),
        postgresql_where=sa.text("source_entry_id IS NOT NULL"),
    )
    op.drop_index("ix_loyalty_activity_program_id", table_name="loyalty_activity")
    op.drop_index("ix_loyalty_activity_order_id", table_name="loyalty_activity")


def downgrade() -> None:
    """Revert this revision."""
    op.create_index("ix_loyalty_activity_order_id", "loyalty_activity", ["order_id"])
    op.create_index("ix_loyalty_activity_program_id", "loyalty_activity", ["program_id"])
    op.drop_index(SOURCE_ENTRY, table_name="loyalty_ledger_entry")
    op.create_index(SOURCE_ENTRY, "loyalty_ledger_entry", ["source_entry_id"])
    op.create_index("ix_loyalty_ledger_entry_order_id", "loyalty_ledger_entry", ["order_id"])
    op.create_index("ix_loyalty_ledger_entry_program_id", "loyalty_ledger_entry", ["program_id"])
