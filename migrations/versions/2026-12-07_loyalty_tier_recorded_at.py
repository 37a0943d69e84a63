"""loyalty: tier changes record when they were committed; the activation feed reads by it

Revision ID: 0013_loyalty_tier_recorded_at
Revises: 0012_loyalty_earn_history
Create Date: 2026-12-07 07:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013_loyalty_tier_recorded_at"
down_revision: str | None = "0012_loyalty_earn_history"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision: existing changes count as recorded when they took effect (when
    they were written is not known; that is what the feed showed them at until now)."""
    with op.batch_alter_table("loyalty_tier_change") as batch:
        batch.add_column(sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE loyalty_tier_change SET recorded_at = at")
    with op.batch_alter_table("loyalty_tier_change") as batch:
        batch.alter_column("recorded_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index(
        "ix_loyalty_tier_change_feed",
        "loyalty_tier_change",
        ["program_id", "recorded_at", "id"],
        unique=False,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index("ix_loyalty_tier_change_feed", table_name="loyalty_tier_change")
    with op.batch_alter_table("loyalty_tier_change") as batch:
        batch.drop_column("recorded_at")
