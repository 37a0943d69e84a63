"""loyalty: drop the tier changes' programme index, which the feed index now covers

Revision ID: 0015_loyalty_tier_change_index
Revises: 0014_loyalty_member_status
Create Date: 2026-12-07 17:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015_loyalty_tier_change_index"
down_revision: str | None = "0014_loyalty_member_status"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision: `ix_loyalty_tier_change_feed` leads with `program_id`, so every
    read by programme uses it; the single-column index only cost writes."""
    op.drop_index("ix_loyalty_tier_change_program_id", table_name="loyalty_tier_change")


def downgrade() -> None:
    """Revert this revision."""
    op.create_index(
        "ix_loyalty_tier_change_program_id", "loyalty_tier_change", ["program_id"], unique=False
    )
