"""Operational tables of the identity package: the resolution rules and the privacy audit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from cdp.db import Base, UtcDateTime, new_id, utcnow


class IdentityRuleSet(Base):
    """The resolution rules in force (one row, id 1), as a JSON document."""

    __tablename__ = "identity_rule_set"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON document
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(200))


class IdentityAudit(Base):
    """One privacy operation (erase, export): who, when, on which profile, what was done."""

    __tablename__ = "identity_audit"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    action: Mapped[str] = mapped_column(String(20), index=True)
    profile_id: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON document
