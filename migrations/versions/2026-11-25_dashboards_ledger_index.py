"""dashboards: covering indexes of the loyalty ledger and members by time (KPIs per period)

Revision ID: 0008_dashboards_ledger_index
Revises: 0007_ingestion_uploads
Create Date: 2026-11-25 12:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_dashboards_ledger_index"
down_revision: str | None = "0007_ingestion_uploads"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_index(
        "ix_loyalty_ledger_entry_occurred",
        "loyalty_ledger_entry",
        ["occurred_at", "kind", "program_id", "member_id", "points"],
        unique=False,
    )
    op.create_index(
        "ix_loyalty_member_enrolled",
        "loyalty_member",
        ["enrolled_at", "status", "program_id"],
        unique=False,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_loyalty_member_enrolled", table_name="loyalty_member")
    op.drop_index("ix_loyalty_ledger_entry_occurred", table_name="loyalty_ledger_entry")
