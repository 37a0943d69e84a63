"""loyalty: the members' entries index covers what the tier metric reads

Revision ID: 0016_loyalty_member_entries
Revises: 0015_loyalty_tier_change_index
Create Date: 2026-12-08 01:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016_loyalty_member_entries"
down_revision: str | None = "0015_loyalty_tier_change_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NAME = "ix_loyalty_ledger_entry_member_created"
_TABLE = "loyalty_ledger_entry"


def upgrade() -> None:
    """Apply this revision: (member, created_at) gains occurred_at, qualifying_points and
    event_id, so the tier metric's read of a member's year is index-only. Its prefix is
    unchanged: every query that used it keeps its plan."""
    op.drop_index(_NAME, table_name=_TABLE)
    op.create_index(
        _NAME,
        _TABLE,
        ["member_id", "created_at", "occurred_at", "qualifying_points", "event_id"],
        unique=False,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index(_NAME, table_name=_TABLE)
    op.create_index(_NAME, _TABLE, ["member_id", "created_at"], unique=False)
