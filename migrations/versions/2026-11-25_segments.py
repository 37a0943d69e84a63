"""segments: attribute and segment definitions

Revision ID: 0006_segments
Revises: 0003_identity
Create Date: 2026-11-25 08:38:12.771497
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_segments"
down_revision: str | None = "0003_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "segments_attribute",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=63), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments_attribute")),
        sa.UniqueConstraint("name", name=op.f("uq_segments_attribute_name")),
    )
    op.create_table(
        "segments_segment",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("rule", sa.JSON(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("refresh_minutes", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=True),
        sa.Column("last_refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_size", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments_segment")),
        sa.UniqueConstraint("name", name=op.f("uq_segments_segment_name")),
    )
    op.create_table(
        "segments_segment_version",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("segment_id", sa.String(length=36), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("rule", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["segments_segment.id"],
            name=op.f("fk_segments_segment_version_segment_id_segments_segment"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments_segment_version")),
        sa.UniqueConstraint(
            "segment_id", "version", name=op.f("uq_segments_segment_version_segment_id_version")
        ),
    )
    with op.batch_alter_table("segments_segment_version", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_segments_segment_version_segment_id"), ["segment_id"], unique=False
        )


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("segments_segment_version", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_segments_segment_version_segment_id"))

    op.drop_table("segments_segment_version")
    op.drop_table("segments_segment")
    op.drop_table("segments_attribute")
