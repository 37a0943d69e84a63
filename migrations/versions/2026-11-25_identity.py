"""identity: resolution rules and the privacy audit

Revision ID: 0003_identity
Revises: 0004_loyalty
Create Date: 2026-11-25 08:31:26.428099
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_identity"
down_revision: str | None = "0004_loyalty"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "identity_audit",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("profile_id", sa.String(length=64), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_audit")),
    )
    with op.batch_alter_table("identity_audit", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_identity_audit_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_identity_audit_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_identity_audit_profile_id"), ["profile_id"], unique=False
        )

    op.create_table(
        "identity_rule_set",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_identity_rule_set")),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("identity_rule_set")
    with op.batch_alter_table("identity_audit", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identity_audit_profile_id"))
        batch_op.drop_index(batch_op.f("ix_identity_audit_at"))
        batch_op.drop_index(batch_op.f("ix_identity_audit_action"))

    op.drop_table("identity_audit")
