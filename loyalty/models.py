"""Operational tables of the loyalty engine: programmes, members, the ledger and its lots."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from cdp.db import Base, UtcDateTime, new_id, utcnow


class Program(Base):
    """A loyalty programme: its currency, enrolment, pending period, expiry and tier policy."""

    __tablename__ = "loyalty_program"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    points_name: Mapped[str] = mapped_column(String(50), default="points")
    point_value: Mapped[float] = mapped_column(Float, default=0.01)
    currency: Mapped[str] = mapped_column(String(3), default="EUR")
    enrolment: Mapped[str] = mapped_column(String(20), default="explicit")
    pending_days: Mapped[int] = mapped_column(Integer, default=0)
    expiry_policy: Mapped[str] = mapped_column(String(20), default="none")
    expiry_months: Mapped[int | None] = mapped_column(Integer)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    status: Mapped[str] = mapped_column(String(20), default="draft")
    tier_metric: Mapped[str] = mapped_column(String(20), default="points")
    tier_window: Mapped[str] = mapped_column(String(20), default="rolling_12_months")
    tier_grace_days: Mapped[int] = mapped_column(Integer, default=0)
    # High-water mark of the warehouse `events` processed for this programme.
    last_event_id: Mapped[int] = mapped_column(BigInteger, default=0)
    # False: each activation moves the mark to the present, so events loaded while the
    # programme was not active never earn in real time (the backfill still can).
    earn_history: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # High-water mark of identity's published merges (`seq`) applied to the memberships.
    last_merge_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # High-water mark of identity's published erasures (`seq`) applied to the memberships.
    last_erasure_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Tier(Base):
    """One step of a programme's status ladder."""

    __tablename__ = "loyalty_tier"
    __table_args__ = (UniqueConstraint("program_id", "rank"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_program.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    rank: Mapped[int] = mapped_column(Integer)
    threshold: Mapped[float] = mapped_column(Float)
    multiplier: Mapped[float] = mapped_column(Float, default=1.0)
    benefits: Mapped[list[str]] = mapped_column(JSON, default=list)


class Member(Base):
    """A profile's membership of a programme."""

    __tablename__ = "loyalty_member"
    __table_args__ = (
        UniqueConstraint("program_id", "profile_id"),
        # Enrolments per period (dashboards): covering, read from the index alone.
        Index("ix_loyalty_member_enrolled", "enrolled_at", "status", "program_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_program.id", ondelete="CASCADE"), index=True
    )
    profile_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default="active")
    enrolled_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    status_changed_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    tier_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("loyalty_tier.id", ondelete="SET NULL")
    )
    tier_since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Below its threshold since then; downgraded at a re-evaluation after the grace period.
    below_tier_since: Mapped[datetime | None] = mapped_column(UtcDateTime)
    merged_into: Mapped[str | None] = mapped_column(String(36), index=True)
    # Bumped to take the member's write lock on SQLite (see docs/loyalty.md).
    lock_seq: Mapped[int] = mapped_column(Integer, default=0)


class MemberStatusChange(Base):
    """One change of a membership's status (enrolment, leaving, coming back, merge, erasure),
    at the instant it took effect: earning reads a member's status at each event's time."""

    __tablename__ = "loyalty_member_status_change"
    __table_args__ = (
        # Who ever left a programme: the only members whose status at an event's time can
        # differ from their current one, so earning looks no further (see `loyalty.status`).
        Index("ix_loyalty_member_status_change_left", "program_id", "status", "member_id"),
        Index("ix_loyalty_member_status_change_member", "member_id", "at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(String(36))
    member_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_member.id", ondelete="CASCADE")
    )
    # The status from `at` on: active, unenrolled, opted_out, merged, erased.
    status: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UtcDateTime)
    # What changed it: enrol, unenrol, opt_out, automatic, import, merge, split, erasure,
    # migration (a row 0014 wrote for a membership that existed before).
    reason: Mapped[str] = mapped_column(String(20))


class LedgerEntry(Base):
    """One append-only movement of points; never updated once written."""

    __tablename__ = "loyalty_ledger_entry"
    __table_args__ = (
        # A member's entries by time of writing (history), and covering what the tier
        # metric reads of them (`engine._tier_priors`): the real-time job reads the year of
        # each member of a batch from this index alone, not from entries spread over the
        # table (migration 0016).
        Index(
            "ix_loyalty_ledger_entry_member_created",
            "member_id",
            "created_at",
            "occurred_at",
            "qualifying_points",
            "event_id",
        ),
        Index("ix_loyalty_ledger_entry_caps", "rule_id", "member_id", "local_date"),
        # The dashboards read the ledger by time (points flows, active members per period):
        # covering, so a range of days is read from the index alone.
        Index(
            "ix_loyalty_ledger_entry_occurred",
            "occurred_at",
            "kind",
            "program_id",
            "member_id",
            "points",
        ),
        # Refunds look an order's entries up by (programme, order): without the pair, SQLite
        # may pick the programme index and scan every entry of the programme per refund. It
        # also serves every "entries of a programme" read (its prefix), so the programme has
        # no index of its own (migration 0010: one B-tree less to write per entry).
        Index("ix_loyalty_ledger_entry_program_order", "program_id", "order_id"),
        # Only `split` transfers name a source entry: a partial index holds those alone, so
        # the other entries (nearly all) write nothing to it.
        Index(
            "ix_loyalty_ledger_entry_source_entry_id",
            "source_entry_id",
            sqlite_where=text("source_entry_id IS NOT NULL"),
            postgresql_where=text("source_entry_id IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_program.id", ondelete="CASCADE")
    )
    member_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_member.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(20))
    points: Mapped[int] = mapped_column(BigInteger)
    qualifying_points: Mapped[int] = mapped_column(BigInteger, default=0)
    # Points a debit could not take because the member's balance did not hold them.
    unrecovered: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[str] = mapped_column(String(20), default="active")
    pending_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    local_date: Mapped[date] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    message_id: Mapped[str | None] = mapped_column(String(200))
    order_id: Mapped[str | None] = mapped_column(String(200))
    rule_id: Mapped[str | None] = mapped_column(String(36))
    redemption_id: Mapped[str | None] = mapped_column(String(36))
    # The entry whose points or qualifying points a `split` transfer moves to another member.
    source_entry_id: Mapped[str | None] = mapped_column(String(36))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)


class Lot(Base):
    """The points of one crediting entry and what is left of them."""

    __tablename__ = "loyalty_lot"

    entry_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_ledger_entry.id", ondelete="CASCADE"), primary_key=True
    )
    program_id: Mapped[str] = mapped_column(String(36), index=True)
    # The current owner: a merge moves lots to the surviving member.
    member_id: Mapped[str] = mapped_column(String(36), index=True)
    points: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    earned_at: Mapped[datetime] = mapped_column(UtcDateTime)
    pending_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    order_id: Mapped[str | None] = mapped_column(String(200))


class LotDraw(Base):
    """How much one debiting entry took from one lot (negative: given back)."""

    __tablename__ = "loyalty_lot_draw"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entry_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_ledger_entry.id", ondelete="CASCADE"), index=True
    )
    lot_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_lot.entry_id", ondelete="CASCADE"), index=True
    )
    points: Mapped[int] = mapped_column(BigInteger)


class Activity(Base):
    """A member's purchase activity (spend, orders) per event, for tiers, refunds and KPIs."""

    __tablename__ = "loyalty_activity"
    # (programme, order) serves the refunds' lookups and, by its prefix, every "activity of a
    # programme" read: the programme and the order have no index of their own (migration 0010).
    __table_args__ = (Index("ix_loyalty_activity_program_order", "program_id", "order_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(String(36))
    member_id: Mapped[str] = mapped_column(String(36), index=True)
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    order_id: Mapped[str | None] = mapped_column(String(200))
    spend: Mapped[float] = mapped_column(Float, default=0.0)
    orders: Mapped[int] = mapped_column(Integer, default=0)
    occurred_at: Mapped[datetime] = mapped_column(UtcDateTime)
    idempotency_key: Mapped[str] = mapped_column(String(300), unique=True)


class MemberMerge(Base):
    """A recorded merge (or split) of two memberships after identity merged two profiles."""

    __tablename__ = "loyalty_member_merge"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(10))
    from_member_id: Mapped[str] = mapped_column(String(36))
    to_member_id: Mapped[str] = mapped_column(String(36))
    points: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    reason: Mapped[str | None] = mapped_column(Text)


class TierChange(Base):
    """One tier movement of a member."""

    __tablename__ = "loyalty_tier_change"
    # The activation feed reads a programme's changes by when they were recorded, in
    # (recorded_at, id) order: from the index alone up to the rows it returns. It serves
    # every other read by programme too.
    __table_args__ = (Index("ix_loyalty_tier_change_feed", "program_id", "recorded_at", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(String(36))
    member_id: Mapped[str] = mapped_column(String(36), index=True)
    from_tier_id: Mapped[str | None] = mapped_column(String(36))
    to_tier_id: Mapped[str | None] = mapped_column(String(36))
    reason: Mapped[str] = mapped_column(String(20))
    metric_value: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # The event whose processing reached the new tier (upgrades while processing events).
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    # When the change was committed (`at` is when it took effect, an event's time for an
    # upgrade reached by processing events: a late event or a backfill dates it in the past).
    # `tiers.record_change` has it set at commit, after every earlier change of the programme.
    recorded_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Rule(Base):
    """An earning rule: trigger, condition, formula, window, stacking and caps."""

    __tablename__ = "loyalty_rule"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_program.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    event_name: Mapped[str] = mapped_column(String(200))
    condition: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # Any: JSON
    formula: Mapped[dict[str, Any]] = mapped_column(JSON)  # Any: JSON
    priority: Mapped[int] = mapped_column(Integer, default=100)
    exclusive: Mapped[bool] = mapped_column(Boolean, default=False)
    apply_tier_multiplier: Mapped[bool] = mapped_column(Boolean, default=True)
    qualifying: Mapped[bool] = mapped_column(Boolean, default=True)
    starts_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ends_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cap_per_day: Mapped[int | None] = mapped_column(BigInteger)
    cap_per_month: Mapped[int | None] = mapped_column(BigInteger)
    budget: Mapped[int | None] = mapped_column(BigInteger)
    limit_per_member: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Reward(Base):
    """A catalogue item members can redeem points for."""

    __tablename__ = "loyalty_reward"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_program.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))
    description: Mapped[str | None] = mapped_column(Text)
    points_cost: Mapped[int] = mapped_column(BigInteger)
    stock: Mapped[int | None] = mapped_column(Integer)
    per_member_limit: Mapped[int | None] = mapped_column(Integer)
    valid_from: Mapped[datetime | None] = mapped_column(UtcDateTime)
    valid_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    min_tier_id: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("loyalty_tier.id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Redemption(Base):
    """A reward redeemed by a member, with its coupon code."""

    __tablename__ = "loyalty_redemption"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    program_id: Mapped[str] = mapped_column(String(36), index=True)
    member_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_member.id", ondelete="CASCADE"), index=True
    )
    reward_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("loyalty_reward.id", ondelete="CASCADE"), index=True
    )
    points: Mapped[int] = mapped_column(BigInteger)
    coupon_code: Mapped[str] = mapped_column(String(40), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="issued")
    entry_id: Mapped[str] = mapped_column(String(36))
    cancel_entry_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class IdempotencyRecord(Base):
    """The stored result of a write request, replayed when its Idempotency-Key comes again."""

    __tablename__ = "loyalty_idempotency_record"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    scope: Mapped[str] = mapped_column(String(200))
    key: Mapped[str] = mapped_column(String(200))
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
