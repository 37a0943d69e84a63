"""The status ladder: qualification metrics over a window, upgrades, downgrades with grace."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import polars as pl
from sqlalchemy import event, func, inspect, or_, select, update
from sqlalchemy.orm import Session, SessionTransaction

from cdp.db import all_rows, utcnow
from loyalty import calendar, ledger
from loyalty.models import Activity, LedgerEntry, Member, Program, Tier, TierChange

logger = logging.getLogger(__name__)

# Tier history reason of a tier set by an opening-balance import.
IMPORT_REASON = "import"
# An imported tier is kept this long whatever the metric says: the points, spend or orders
# that earned it are in the old system, not in this ledger, so the first re-evaluations
# would otherwise step every imported member down.
IMPORT_HOLD_MONTHS = 12

# `Session.info` key: the tier changes the session's transaction added, stamped at its commit.
_UNSTAMPED = "loyalty.tier_changes_to_stamp"
# Two stamps of a programme's feed are at least this far apart, so none ties with another.
_TICK = timedelta(microseconds=1)


def record_change(session: Session, change: TierChange) -> None:
    """Add a tier change to the session; its `recorded_at` is set when the transaction
    commits (`_stamp_recorded`)."""
    session.add(change)
    session.info.setdefault(_UNSTAMPED, []).append(change)


def _feed_lock_key(program_id: str) -> int:
    """The PostgreSQL advisory lock key of a programme's tier-change feed."""
    digest = hashlib.sha1(f"loyalty_tier_change:{program_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@event.listens_for(Session, "before_commit")
def _stamp_recorded(session: Session) -> None:
    """Stamp the transaction's tier changes with `recorded_at` values later than every change
    of their programme committed before, one microsecond apart in the order they were made.

    A change becomes visible at its commit, so its stamp must not be older than what the feed
    has already shown: a stamp taken when the row was written (a backfill holds its
    transaction for minutes) would land behind a `since` a consumer already read, as the
    event time did. PostgreSQL: a transaction-scoped advisory lock per programme, held until
    the commit ends, makes two transactions stamp and commit one after the other. SQLite: the
    flush below holds the database's write lock from before the stamp until the commit.
    """
    if session.in_nested_transaction():
        return
    pending = session.info.pop(_UNSTAMPED, None)
    if not pending:
        return
    session.flush()
    changes = [c for c in pending if inspect(c).persistent]
    programs = sorted({c.program_id for c in changes})
    if session.get_bind().dialect.name == "postgresql":
        for program_id in programs:  # in id order, so two committers cannot deadlock
            session.execute(select(func.pg_advisory_xact_lock(_feed_lock_key(program_id))))
    latest: dict[str, datetime] = {
        program_id: at
        for program_id, at in session.execute(
            select(TierChange.program_id, func.max(TierChange.recorded_at))
            .where(TierChange.program_id.in_(programs))
            .group_by(TierChange.program_id)
        )
    }
    now = utcnow()
    nexts = {p: max(now, latest[p] + _TICK) if p in latest else now for p in programs}
    for change in changes:
        change.recorded_at = nexts[change.program_id]
        nexts[change.program_id] += _TICK


@event.listens_for(Session, "after_transaction_end")
def _forget_unstamped(session: Session, transaction: SessionTransaction) -> None:
    """Drop what a rolled-back transaction left to stamp."""
    if transaction.parent is None:
        session.info.pop(_UNSTAMPED, None)


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
    """The qualification metric of each member (with memberships merged into it) in the window.

    Per chunk of members: their memberships (and those merged into them), then the sum of
    each membership's entries (or activity) in the window, read by member."""
    if not member_ids:
        return {}
    since = window_start(program, now)
    if program.tier_metric == "points":
        table: Any = LedgerEntry  # Any: a mapped class
        value: Any = LedgerEntry.qualifying_points  # Any: a column
    else:
        table = Activity
        value = Activity.spend if program.tier_metric == "spend" else Activity.orders
    # The window is compared through an expression no index serves: with a list of a thousand
    # members and a year's window, SQLite preferred walking the ledger's time index over the
    # whole window and probing the members (12 s per thousand members at 8.5M entries; the
    # real-time path evaluates every batch's members, the nightly re-evaluation the members
    # it downgrades). Read by member instead, through the member index.
    when = ledger.unindexed(table.occurred_at)
    values: dict[str, float] = dict.fromkeys(member_ids, 0.0)
    for chunk in ledger.in_chunks(member_ids):
        owner_of = dict(
            session.execute(
                select(Member.id, func.coalesce(Member.merged_into, Member.id)).where(
                    Member.program_id == program.id,
                    (Member.id.in_(chunk)) | (Member.merged_into.in_(chunk)),
                )
            ).all()
        )
        for part in ledger.in_chunks(sorted(owner_of)):
            sums = session.execute(
                select(table.member_id, func.sum(value))
                .where(table.member_id.in_(part), when >= since, when <= now)
                .group_by(table.member_id)
            )
            for member_id, total in sums:
                owner = owner_of[member_id]
                if owner in values:
                    values[owner] += float(total or 0)
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
) -> list[Move]:
    """Upgrade members who reached a higher tier (after earning; downgrades happen only at
    the periodic re-evaluation, `reevaluate`)."""
    tiers = ladder(session, program_id=program.id)
    if not tiers or not member_ids:
        return []
    ranks = {t.id: t.rank for t in tiers}
    values = metrics(session, program=program, member_ids=member_ids, now=now)
    members = [
        member
        for chunk in ledger.in_chunks(member_ids)
        for member in session.scalars(
            select(Member).where(Member.id.in_(chunk), Member.status == "active")
        )
    ]
    moves: list[Move] = []
    for member in members:
        value = values.get(member.id, 0.0)
        target = _target(tiers, value)
        current_rank = ranks.get(member.tier_id, 0) if member.tier_id else 0
        target_rank = target.rank if target is not None else 0
        if target_rank > current_rank:
            moves.append(_move(session, program, member, target, "upgrade", value, now))
        elif target_rank == current_rank:
            member.below_tier_since = None
    session.flush()
    return moves


def _metric_by_owner(
    program: Program, now: datetime, *, at_least: float | None
) -> Any:  # Any: a SQL subquery
    """`owner, value`: the metric in the window of every membership of the programme that
    has any (and reaches `at_least`), the memberships merged into one counted for it (as
    `metrics` counts them)."""
    since = window_start(program, now)
    owner = func.coalesce(Member.merged_into, Member.id).label("owner")
    if program.tier_metric == "points":
        value: Any = LedgerEntry.qualifying_points  # Any: a column
        table: Any = LedgerEntry  # Any: a mapped class
    else:
        value = Activity.spend if program.tier_metric == "spend" else Activity.orders
        table = Activity
    query = (
        select(owner, func.sum(value).label("value"))
        .select_from(table)
        .join(Member, Member.id == table.member_id)
        .where(
            Member.program_id == program.id,
            table.program_id == program.id,
            table.occurred_at >= since,
            table.occurred_at <= now,
        )
        .group_by(owner)
    )
    if at_least is not None:
        query = query.having(func.sum(value) >= at_least)
    return query.subquery()


def reevaluate(session: Session, *, program: Program, now: datetime) -> list[Move]:
    """The periodic re-evaluation of every active member of the programme, set-based:
    upgrades, and downgrades of members below their tier's threshold for longer than the
    programme's grace period (unless the tier is an imported one still held).

    One grouped statement over the ledger (or the activity) gives the metric of the members
    reaching the lowest threshold, and one more the active members holding a tier or marked
    below one: only the members something can happen to come back. Members are
    loaded as objects only to move them; the grace marks are set and cleared with one
    `UPDATE` per chunk of ids. Same decisions as `evaluate`, with no statement binding one
    parameter per member (a programme with more members than SQLite's 32,766 or
    PostgreSQL's 65,535 variables failed).
    """
    tiers = ladder(session, program_id=program.id)
    if not tiers:
        return []
    session.flush()
    ranks = {t.id: t.rank for t in tiers}
    lowest = min(t.threshold for t in tiers)
    # The owners whose metric reaches the lowest threshold (every owner with anything in the
    # window when a tier starts at 0 or below), joined to their active members by key: a
    # LEFT JOIN of every member to the grouped metric made SQLite scan the grouped rows
    # once per member (11 s for 20,000 members).
    metric = _metric_by_owner(program, now, at_least=lowest if lowest > 0 else None)
    reached = session.execute(
        select(Member.id, Member.tier_id, Member.below_tier_since, metric.c.value)
        .join(metric, metric.c.owner == Member.id)
        .where(Member.status == "active")
    ).all()
    values = {member_id: float(value or 0) for member_id, _, _, value in reached}
    others = select(Member.id, Member.tier_id, Member.below_tier_since).where(
        Member.program_id == program.id, Member.status == "active"
    )
    if lowest > 0:
        others = others.where(Member.tier_id.is_not(None) | Member.below_tier_since.is_not(None))
    # A member left out of `reached` has 0 (no tier at 0 or below), or less than the lowest
    # threshold: no tier either way; its exact value is read below if it moves.
    candidates = sorted(
        {(m, t, b) for m, t, b, _ in reached}
        | {(m, t, b) for m, t, b in session.execute(others) if m not in values}
    )
    held = _imported_tiers_held(session, program_id=program.id, now=now)
    grace = timedelta(days=program.tier_grace_days)
    movers: dict[str, tuple[Tier | None, str, float]] = {}
    below_from_now: list[str] = []
    below_cleared: list[str] = []
    for member_id, tier_id, below in candidates:
        metric_value = values.get(member_id, 0.0)
        target = _target(tiers, metric_value)
        current_rank = ranks.get(tier_id, 0) if tier_id else 0
        target_rank = target.rank if target is not None else 0
        if target_rank > current_rank:
            movers[member_id] = (target, "upgrade", metric_value)
        elif target_rank < current_rank:
            if held.get(member_id) == tier_id:
                continue
            if now - (below or now) >= grace:
                movers[member_id] = (target, "downgrade", metric_value)
            elif below is None:
                below_from_now.append(member_id)
        elif below is not None:
            below_cleared.append(member_id)
    for ids, mark in ((below_from_now, now), (below_cleared, None)):
        for chunk in ledger.in_chunks(ids, 10_000):
            session.execute(
                update(Member).where(Member.id.in_(chunk)).values(below_tier_since=mark)
            )
    unknown = [m for m in movers if m not in values and lowest > 0]
    exact = metrics(session, program=program, member_ids=unknown, now=now)
    movers |= {
        m: (target, reason, exact[m]) for m, (target, reason, _) in movers.items() if m in exact
    }
    loaded = {
        member.id: member
        for chunk in ledger.in_chunks(sorted(movers), 10_000)
        for member in session.scalars(select(Member).where(Member.id.in_(chunk)))
    }
    moves = [
        _move(session, program, loaded[member_id], target, reason, metric_value, now)
        for member_id, (target, reason, metric_value) in movers.items()
    ]
    session.flush()
    return moves


def _imported_tiers_held(
    session: Session, *, program_id: str, now: datetime
) -> dict[str, str | None]:
    """Member id -> the tier an import gave it within `IMPORT_HOLD_MONTHS` (still held while
    it is the member's tier: an upgrade since ends the hold), for a whole programme."""
    since = now - timedelta(days=round(IMPORT_HOLD_MONTHS * 365.25 / 12))
    return {
        member_id: tier_id
        for member_id, tier_id in session.execute(
            select(TierChange.member_id, TierChange.to_tier_id)
            .where(
                TierChange.program_id == program_id,
                TierChange.reason == IMPORT_REASON,
                TierChange.at > since,
            )
            .order_by(TierChange.at)
        )
    }


def _move(
    session: Session,
    program: Program,
    member: Member,
    target: Tier | None,
    reason: str,
    value: float,
    now: datetime,
    event_id: int | None = None,
) -> Move:
    move = Move(member.id, member.tier_id, target.id if target else None, reason, value)
    member.tier_id = move.to_tier_id
    member.tier_since = now
    member.below_tier_since = None
    record_change(
        session,
        TierChange(
            program_id=program.id,
            member_id=member.id,
            from_tier_id=move.from_tier_id,
            to_tier_id=move.to_tier_id,
            reason=reason,
            metric_value=value,
            at=now,
            event_id=event_id,
        ),
    )
    # DEBUG: a re-evaluation moves tens of thousands of members (84,000 at 1M); the job's
    # own line says how many, and the tier-change feed has each one.
    logger.debug("tier changed", extra={"member_id": member.id, "reason": reason})
    return move


def window_starts(program: Program, instants: pl.Series) -> pl.Series:
    """`window_start` of each instant (UTC), computed once per distinct local date."""
    local = instants.dt.convert_time_zone(program.timezone).dt.date()
    starts = {
        day: window_start(program, calendar.start_of_day(day, program.timezone))
        for day in local.unique().to_list()
    }
    return local.replace_strict(
        list(starts), list(starts.values()), return_dtype=pl.Datetime("us", "UTC")
    ).alias("window_start")


def _reached(ladder_: list[Tier], metric: pl.Expr) -> pl.Expr:
    """The rank of the highest tier whose threshold the metric reaches (0: none)."""
    rank: pl.Expr = pl.lit(0, dtype=pl.Int64)
    for tier in ladder_:
        rank = pl.when(metric >= tier.threshold).then(pl.lit(tier.rank)).otherwise(rank)
    return rank


def row_ranks(
    program: Program, ladder_: list[Tier], rows: pl.DataFrame, values: pl.DataFrame
) -> pl.DataFrame:
    """The tier rank of each member at each event of a batch, as one-by-one processing has it.

    `rows` (row, member_id, timestamp, start_rank) are the batch's events in processing order;
    `values` (member_id, occurred_at, row, value) are what counts toward the metric: the
    ledger's before the batch (row null) and what each row adds. After row j the member
    qualifies with the values in [window start at ts_j, ts_j] up to row j; a member holds
    at row i the highest rank reached after its earlier rows (never below its start rank:
    processing only upgrades). Returns row, member_id, timestamp, metric, rank_before,
    rank_after.
    """
    markers = rows.select(
        "member_id",
        pl.col("timestamp").alias("occurred_at"),
        (pl.col("row").cast(pl.Float64) + 0.5).alias("seq"),
        pl.lit(0.0).alias("value"),
        pl.col("row").cast(pl.Int64),
    )
    counted = values.select(
        "member_id",
        "occurred_at",
        pl.col("row").cast(pl.Float64).fill_null(-1.0).alias("seq"),
        pl.col("value").cast(pl.Float64),
        pl.lit(None, dtype=pl.Int64).alias("row"),
    )
    merged = (
        pl.concat([counted, markers])
        .sort("member_id", "occurred_at", "seq")
        .with_columns(pl.col("value").cum_sum().over("member_id").alias("cum"))
    )
    at_row = merged.filter(pl.col("row").is_not_null()).select("row", pl.col("cum").alias("upto"))
    last_by_instant = (
        merged.group_by("member_id", "occurred_at", maintain_order=True)
        .agg(pl.col("cum").last())
        .sort("occurred_at")
    )
    starts = rows.with_columns(window_starts(program, rows["timestamp"])).sort("window_start")
    before = starts.join_asof(
        last_by_instant,
        left_on="window_start",
        right_on="occurred_at",
        by="member_id",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).select(pl.col("row").cast(pl.Int64), pl.col("cum").fill_null(0.0).alias("before"))
    return (
        rows.with_columns(pl.col("row").cast(pl.Int64))
        .join(at_row, on="row")
        .join(before, on="row")
        .sort("row")
        .with_columns((pl.col("upto") - pl.col("before")).round(6).alias("metric"))
        .with_columns(_reached(ladder_, pl.col("metric")).alias("reached"))
        .with_columns(
            pl.max_horizontal(
                pl.col("start_rank"),
                pl.col("reached").shift(1).cum_max().over("member_id").fill_null(0),
            ).alias("rank_before")
        )
        .with_columns(
            pl.max_horizontal("rank_before", "reached").alias("rank_after"),
        )
        .select(
            "row",
            "member_id",
            "timestamp",
            "event_id",
            "metric",
            "rank_before",
            "rank_after",
            "reached",
        )
    )


def ranks_at(
    session: Session, *, program: Program, ladder_: list[Tier], rows: pl.DataFrame
) -> pl.Series:
    """The rank each member held at each row's event, from its tier history.

    `rows` has member_id, timestamp, event_id and current_rank. The tier held at an event is
    the one of the member's last change before it (a change at the same instant counts
    unless it was reached by this event or a later one); a member without any history holds
    its current tier; one whose history starts later holds none.
    """
    by_id = {t.id: t.rank for t in ladder_}
    members = rows["member_id"].unique().to_list()
    found = [
        change
        for chunk in ledger.in_chunks(members)
        for change in all_rows(
            session,
            select(TierChange.member_id, TierChange.at, TierChange.event_id, TierChange.to_tier_id)
            .where(TierChange.program_id == program.id, TierChange.member_id.in_(chunk))
            .order_by(TierChange.at),
        )
    ]
    changes = pl.DataFrame(
        [(m, at, e, by_id.get(t or "", 0)) for m, at, e, t in found],
        schema={
            "member_id": pl.String(),
            "at": pl.Datetime("us", "UTC"),
            "change_event": pl.Int64(),
            "held": pl.Int64(),
        },
        orient="row",
    ).sort("at")
    history = changes["member_id"].unique().implode()
    keyed = rows.with_row_index("_i").sort("timestamp")
    # Both sides are sorted by time above; Polars cannot verify that per `by` group and warns.
    upto = keyed.join_asof(
        changes,
        left_on="timestamp",
        right_on="at",
        by="member_id",
        strategy="backward",
        check_sortedness=False,
    )
    before = keyed.join_asof(
        changes.select("member_id", "at", pl.col("held").alias("held_before")),
        left_on="timestamp",
        right_on="at",
        by="member_id",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).select("_i", "held_before")
    same_instant_later = (
        (pl.col("at") == pl.col("timestamp"))
        & pl.col("change_event").is_not_null()
        & pl.col("event_id").is_not_null()
        & (pl.col("change_event") >= pl.col("event_id"))
    )
    return (
        upto.join(before, on="_i")
        .sort("_i")
        .select(
            pl.when(~pl.col("member_id").is_in(history))
            .then(pl.col("current_rank"))
            .when(same_instant_later)
            .then(pl.col("held_before").fill_null(0))
            .otherwise(pl.col("held").fill_null(0))
            .alias("start_rank")
        )
        .to_series()
    )


def apply_row_upgrades(
    session: Session, *, program: Program, ladder_: list[Tier], ranks: pl.DataFrame
) -> list[Move]:
    """Record the upgrades `row_ranks` found, each at the instant of the event that reached it
    (only above the member's current tier: replaying old events never moves anyone)."""
    by_rank = {t.rank: t for t in ladder_}
    by_id = {t.id: t.rank for t in ladder_}
    steps = ranks.filter(pl.col("rank_after") > pl.col("rank_before"))
    last = ranks.group_by("member_id").agg(pl.col("reached").last())
    upgraded = set(steps["member_id"].to_list())
    ids = sorted(upgraded | set(last["member_id"].to_list()))
    # Only the members that may change are loaded: those upgraded, and those marked below
    # their tier (a real-time batch of thousands of members otherwise built all of them).
    members = {
        m.id: m
        for chunk in ledger.in_chunks(ids)
        for m in session.scalars(
            select(Member).where(
                Member.id.in_(chunk),
                Member.status == "active",
                or_(
                    Member.below_tier_since.is_not(None),
                    Member.id.in_(sorted(upgraded.intersection(chunk))),
                ),
            )
        )
    }
    moves: list[Move] = []
    for member_id, at, event_id, metric, rank in steps.select(
        "member_id", "timestamp", "event_id", "metric", "rank_after"
    ).iter_rows():
        member = members.get(member_id)
        if member is not None and rank > by_id.get(member.tier_id or "", 0):
            moves.append(
                _move(session, program, member, by_rank[rank], "upgrade", metric, at, event_id)
            )
    for member_id, reached in last.iter_rows():
        member = members.get(member_id)
        if member is not None and reached >= by_id.get(member.tier_id or "", 0):
            member.below_tier_since = None
    session.flush()
    return moves
