"""Operational tables of the ingestion package: sources and import records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cdp.db import Base, UtcDateTime, new_id, utcnow


class Source(Base):
    """A configured source of events: an HTTP write key, files, or a database table."""

    __tablename__ = "ingestion_source"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON
    mapping: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    write_key_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    write_key_prefix: Mapped[str | None] = mapped_column(String(16))
    # Columns of the first file seen; later mappings are checked against them.
    columns: Mapped[list[str] | None] = mapped_column(JSON)
    # Database sources: the last loaded cursor value, as text, and its type.
    cursor_value: Mapped[str | None] = mapped_column(Text)
    cursor_type: Mapped[str | None] = mapped_column(String(20))
    last_pull_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ImportRun(Base):
    """One file import or database pull: what it read, stored and rejected, and how long.

    Status: `queued` (an upload waiting for its background job), `running`, `succeeded`,
    `failed` (also when a stop interrupted it), or `skipped` (same content as before).
    """

    __tablename__ = "ingestion_import"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    source_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("ingestion_source.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(500))
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    # SHA-256 of the file's size and first and last MiB (`files.content_probe`): an earlier
    # import with another probe cannot have had the same content.
    content_probe: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))
    rows_read: Mapped[int] = mapped_column(Integer, default=0)
    # Rows in the file: exact for Parquet, counted lines for CSV/NDJSON; None if unknown.
    rows_total: Mapped[int | None] = mapped_column(BigInteger)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    identifiers_dropped: Mapped[int] = mapped_column(Integer, default=0)
    first_batch_id: Mapped[int | None] = mapped_column(BigInteger)
    last_batch_id: Mapped[int | None] = mapped_column(BigInteger)
    skipped: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # An uploaded file waiting for (or in) its background import; removed afterwards.
    file_path: Mapped[str | None] = mapped_column(Text)
