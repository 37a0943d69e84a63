"""Operational tables of the segments package: attribute and segment definitions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from cdp.db import Base, UtcDateTime, new_id, utcnow


class SegmentsAttribute(Base):
    """A computed attribute defined by a marketer (built-ins live in code and settings)."""

    __tablename__ = "segments_attribute"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    definition: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON document
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class SegmentsSegment(Base):
    """A saved segment: its current rule and version, and how often it is refreshed."""

    __tablename__ = "segments_segment"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    rule: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON document
    version: Mapped[int] = mapped_column(Integer, default=1)
    refresh_minutes: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))
    last_refreshed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    last_size: Mapped[int | None] = mapped_column(Integer)


class SegmentsSegmentVersion(Base):
    """One saved version of a segment's name and rule (append-only)."""

    __tablename__ = "segments_segment_version"
    __table_args__ = (UniqueConstraint("segment_id", "version"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    segment_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("segments_segment.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))
    rule: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON document
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(200))
