"""loyalty: membership status changes recorded with their time (earning at an event's time)

Revision ID: 0014_loyalty_member_status
Revises: 0013_loyalty_tier_recorded_at
Create Date: 2026-12-07 14:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_loyalty_member_status"
down_revision: str | None = "0013_loyalty_tier_recorded_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision: each existing membership gets one row, its current status since
    `status_changed_at` (the last change its row remembers; earlier changes were never
    recorded, so an away period that ended before this revision is not known, and events
    dated before that change keep reading the current status, as they did until now). The
    row's id is the member's own (one row per member, unique)."""
    op.create_table(
        "loyalty_member_status_change",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("program_id", sa.String(length=36), nullable=False),
        sa.Column("member_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=20), nullable=False),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["loyalty_member.id"],
            name=op.f("fk_loyalty_member_status_change_member_id_loyalty_member"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_loyalty_member_status_change")),
    )
    op.execute(
        "INSERT INTO loyalty_member_status_change (id, program_id, member_id, status, at, reason)"
        " SELECT id, program_id, id, status, status_changed_at, 'migration' FROM loyalty_member"
    )
    op.create_index(
        "ix_loyalty_member_status_change_left",
        "loyalty_member_status_change",
        ["program_id", "status", "member_id"],
        unique=False,
    )
    op.create_index(
        "ix_loyalty_member_status_change_member",
        "loyalty_member_status_change",
        ["member_id", "at"],
        unique=False,
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_index(
        "ix_loyalty_member_status_change_member", table_name="loyalty_member_status_change"
    )
    op.drop_index("ix_loyalty_member_status_change_left", table_name="loyalty_member_status_change")
    op.drop_table("loyalty_member_status_change")
