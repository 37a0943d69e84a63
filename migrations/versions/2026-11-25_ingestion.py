"""ingestion: sources and import records

Revision ID: 0002_ingestion
Revises: 0005_dashboards
Create Date: 2026-11-25 08:29:50.489260
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_ingestion"
down_revision: str | None = "0005_dashboards"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "ingestion_source",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("mapping", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("write_key_hash", sa.String(length=64), nullable=True),
        sa.Column("write_key_prefix", sa.String(length=16), nullable=True),
        sa.Column("columns", sa.JSON(), nullable=True),
        sa.Column("cursor_value", sa.Text(), nullable=True),
        sa.Column("cursor_type", sa.String(length=20), nullable=True),
        sa.Column("last_pull_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_source")),
        sa.UniqueConstraint("name", name=op.f("uq_ingestion_source_name")),
        sa.UniqueConstraint("write_key_hash", name=op.f("uq_ingestion_source_write_key_hash")),
    )
    op.create_table(
        "ingestion_import",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("source_id", sa.String(length=36), nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("rows_read", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("rejected", sa.Integer(), nullable=False),
        sa.Column("duplicates", sa.Integer(), nullable=False),
        sa.Column("identifiers_dropped", sa.Integer(), nullable=False),
        sa.Column("first_batch_id", sa.BigInteger(), nullable=True),
        sa.Column("last_batch_id", sa.BigInteger(), nullable=True),
        sa.Column("skipped", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["source_id"],
            ["ingestion_source.id"],
            name=op.f("fk_ingestion_import_source_id_ingestion_source"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_import")),
    )
    with op.batch_alter_table("ingestion_import", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ingestion_import_content_hash"), ["content_hash"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_ingestion_import_source_id"), ["source_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("ingestion_import", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingestion_import_source_id"))
        batch_op.drop_index(batch_op.f("ix_ingestion_import_content_hash"))

    op.drop_table("ingestion_import")
    op.drop_table("ingestion_source")
