"""dashboards: custom dashboards and web sessions

Revision ID: 0005_dashboards
Revises: 0001_foundation
Create Date: 2026-11-25 08:31:51.775298
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_dashboards"
down_revision: str | None = "0001_foundation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "dashboards_dashboard",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("widgets", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["cdp_api_key.id"],
            name=op.f("fk_dashboards_dashboard_created_by_cdp_api_key"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboards_dashboard")),
    )
    with op.batch_alter_table("dashboards_dashboard", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dashboards_dashboard_created_at"), ["created_at"], unique=False
        )

    op.create_table(
        "dashboards_web_session",
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["cdp_api_key.id"],
            name=op.f("fk_dashboards_web_session_key_id_cdp_api_key"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_dashboards_web_session")),
    )
    with op.batch_alter_table("dashboards_web_session", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dashboards_web_session_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_dashboards_web_session_key_id"), ["key_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("dashboards_web_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboards_web_session_key_id"))
        batch_op.drop_index(batch_op.f("ix_dashboards_web_session_expires_at"))

    op.drop_table("dashboards_web_session")
    with op.batch_alter_table("dashboards_dashboard", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboards_dashboard_created_at"))

    op.drop_table("dashboards_dashboard")
