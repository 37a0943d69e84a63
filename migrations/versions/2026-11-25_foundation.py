"""foundation: api keys and job runs

Revision ID: 0001_foundation
Revises:
Create Date: 2026-11-25 08:11:49.924836
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_foundation"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""

    op.create_table(
        "cdp_api_key",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["cdp_api_key.id"],
            name=op.f("fk_cdp_api_key_created_by_cdp_api_key"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cdp_api_key")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_cdp_api_key_key_hash")),
    )
    op.create_table(
        "cdp_job_run",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("job", sa.String(length=100), nullable=False),
        sa.Column("trigger", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cdp_job_run")),
    )
    with op.batch_alter_table("cdp_job_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cdp_job_run_job"), ["job"], unique=False)
        batch_op.create_index(batch_op.f("ix_cdp_job_run_started_at"), ["started_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_cdp_job_run_status"), ["status"], unique=False)


def downgrade() -> None:
    """Revert this revision."""

    with op.batch_alter_table("cdp_job_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_cdp_job_run_status"))
        batch_op.drop_index(batch_op.f("ix_cdp_job_run_started_at"))
        batch_op.drop_index(batch_op.f("ix_cdp_job_run_job"))

    op.drop_table("cdp_job_run")
    op.drop_table("cdp_api_key")
