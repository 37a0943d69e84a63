"""The status ladder: qualification metrics over a window, upgrades, downgrades with grace."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loyalty import calendar
from loyalty.models import Activity, LedgerEntry, Member, Program, Tier, TierChange

logger = logging.getLogger(__name__)


def window_start(program: Program, now: datetime) -> datetime:
    """Where the qualification window starts: 12 months back, or the local new year."""
    today = calendar.local_date(now, program.timezone)
    if program.tier_window == "calendar_year":
        return calendar.start_of_day(date(today.year, 1, 1), program.timezone)
    return calendar.start_of_day(
        calendar.add_months(today, -12) + timedelta(days=1), program.timezone
    )


def ladder(session: Session, *, program_id: str) -> list[Tier]:
    """The programme's tiers, lowest first."""
    return list(
        session.scalars(select(Tier).where(Tier.program_id == program_id).order_by(Tier.rank))
    )


def metrics(
    session: Session, *, program: Program, member_ids: list[str], now: datetime
) -> dict[str, float]:
    """The qualification metric of each member (with memberships merged into it) in the window."""
    if not member_ids:
        return {}
    since = window_start(program, now)
    owner = func.coalesce(Member.merged_into, Member.id)
    values: dict[str, float] = dict.fromkeys(member_ids, 0.0)
    for chunk in [member_ids[i : i + 1000] for i in range(0, len(member_ids), 1000)]:
        group = (
            select(Member.id, owner.label("owner"))
            .where(
                Member.program_id == program.id,
                (Member.id.in_(chunk)) | (Member.merged_into.in_(chunk)),
            )
            .subquery()
        )
        if program.tier_metric == "points":
            query = (
                select(group.c.owner, func.sum(LedgerEntry.qualifying_points))
                .join(LedgerEntry, LedgerEntry.member_id == group.c.id)
                .where(LedgerEntry.occurred_at >= since, LedgerEntry.occurred_at <= now)
                .group_by(group.c.owner)
            )
        else:
            column = Activity.spend if program.tier_metric == "spend" else Activity.orders
            query = (
                select(group.c.owner, func.sum(column))
                .join(Activity, Activity.member_id == group.c.id)
                .where(Activity.occurred_at >= since, Activity.occurred_at <= now)
                .group_by(group.c.owner)
            )
        for member_id, value in session.execute(query).all():
            if member_id in values:
                values[member_id] = float(value or 0)
    return values


@dataclass(frozen=True, slots=True)
class Move:
    """A tier change decided for a member."""

    member_id: str
    from_tier_id: str | None
    to_tier_id: str | None
    reason: str
    value: float


def _target(tiers: list[Tier], value: float) -> Tier | None:
    reached = [t for t in tiers if value >= t.threshold]
    return reached[-1] if reached else None


def evaluate(
    session: Session,
    *,
    program: Program,
    member_ids: list[str],
    now: datetime,
    downgrade: bool = False,
) -> list[Move]:
    """Upgrade members who reached a higher tier; with `downgrade`, also step down those
    below their tier's threshold for longer than the programme's grace period."""
    tiers = ladder(session, program_id=program.id)
    if not tiers or not member_ids:
        return []
    ranks = {t.id: t.rank for t in tiers}
    values = metrics(session, program=program, member_ids=member_ids, now=now)
    members = session.scalars(
        select(Member).where(Member.id.in_(member_ids), Member.status == "active")
    ).all()
    moves: list[Move] = []
    grace = timedelta(days=program.tier_grace_days)
    for member in members:
        value = values.get(member.id, 0.0)
        target = _target(tiers, value)
        current_rank = ranks.get(member.tier_id, 0) if member.tier_id else 0
        target_rank = target.rank if target is not None else 0
        if target_rank > current_rank:
            moves.append(_move(session, program, member, target, "upgrade", value, now))
        elif target_rank < current_rank and downgrade:
            if member.below_tier_since is None:
                member.below_tier_since = now
            if now - member.below_tier_since >= grace:
                moves.append(_move(session, program, member, target, "downgrade", value, now))
        elif target_rank >= current_rank:
            member.below_tier_since = None
    session.flush()
    return moves


def _move(
    session: Session,
    program: Program,
    member: Member,
    target: Tier | None,
    reason: str,
    value: float,
    now: datetime,
) -> Move:
    move = Move(member.id, member.tier_id, target.id if target else None, reason, value)
    member.tier_id = move.to_tier_id
    member.tier_since = now
    member.below_tier_since = None
    session.add(
        TierChange(
            program_id=program.id,
            member_id=member.id,
            from_tier_id=move.from_tier_id,
            to_tier_id=move.to_tier_id,
            reason=reason,
            metric_value=value,
            at=now,
        )
    )
    logger.info("tier changed", extra={"member_id": member.id, "reason": reason})
    return move
