"""Operational tables of the dashboards package: custom dashboards and web sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cdp.db import Base, UtcDateTime, new_id, utcnow


class Dashboard(Base):
    """A saved custom dashboard: a title and its widgets (validated against the catalogue)."""

    __tablename__ = "dashboards_dashboard"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    # Any: JSON documents as validated by schemas.Widget.
    widgets: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_by: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("cdp_api_key.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the table only its SHA-256."""

    __tablename__ = "dashboards_web_session"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("cdp_api_key.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
