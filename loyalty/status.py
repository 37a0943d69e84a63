"""Membership status history: when each member was active or away, so that earning reads a
member's status at each event's time (`loyalty_member_status_change`).

A member that unenrols or opts out and enrols again is away in between: its events dated
in that period earn nothing and record no purchase activity, whether they are processed as
they arrive, in a later sync or by a backfill. Events before a member's first recorded
change (the history a backfill awards when a programme launches) and members with no
unenrolment or opt-out at all keep the member's current status, so only the members who
ever left are looked at (one indexed query per batch, then one as-of join in Polars).
"""

from __future__ import annotations

import logging
from datetime import datetime

import polars as pl
from sqlalchemy import select
from sqlalchemy.orm import Session

from cdp.db import new_id, new_ids
from loyalty import ledger
from loyalty.models import Member, MemberStatusChange

logger = logging.getLogger(__name__)

# Statuses of a member that left the programme for a while: it keeps its points but earns
# nothing, and its orders record no activity.
AWAY = ("unenrolled", "opted_out")

HISTORY_SCHEMA: dict[str, pl.DataType] = {
    "member_id": pl.String(),
    "id": pl.String(),
    "status": pl.String(),
    "at": pl.Datetime("us", "UTC"),
}


def record(session: Session, *, member: Member, status: str, at: datetime, reason: str) -> None:
    """Record that a member's status became `status` at `at`."""
    session.add(
        MemberStatusChange(
            id=new_id(),
            program_id=member.program_id,
            member_id=member.id,
            status=status,
            at=at,
            reason=reason,
        )
    )


def record_many(
    session: Session, *, program_id: str, members: pl.DataFrame, status: str, reason: str
) -> int:
    """Record the same change for many members at once (`members`: member_id, at)."""
    if members.is_empty():
        return 0
    rows = members.select(
        pl.Series("id", new_ids(members.height), dtype=pl.String),
        pl.lit(program_id).alias("program_id"),
        pl.col("member_id"),
        pl.lit(status).alias("status"),
        pl.col("at").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.lit(reason).alias("reason"),
    )
    return ledger.bulk_insert(session, MemberStatusChange.__table__, rows)


def leavers(session: Session, *, program_id: str, members: pl.Series | None) -> pl.Series:
    """Which of `members` (None: of the whole programme) ever unenrolled or opted out, read
    from the (programme, status, member) index alone."""
    change = MemberStatusChange
    left = select(change.member_id).where(change.program_id == program_id, change.status.in_(AWAY))
    if members is None:
        found = list(session.scalars(left.distinct()))
    else:
        found = [
            member
            for chunk in ledger.in_chunks(members.sort().to_list())
            for member in session.scalars(left.where(change.member_id.in_(chunk)))
        ]
    return pl.Series("member_id", found, dtype=pl.String).unique()


def history(session: Session, *, members: list[str]) -> pl.DataFrame:
    """Every recorded change of these members: member_id, id, status, at."""
    change = MemberStatusChange
    rows = [
        row
        for chunk in ledger.in_chunks(sorted(members))
        for row in session.execute(
            select(change.member_id, change.id, change.status, change.at).where(
                change.member_id.in_(chunk)
            )
        ).all()
    ]
    return pl.DataFrame(rows, schema=HISTORY_SCHEMA, orient="row")


def at_events(session: Session, *, program_id: str, frame: pl.DataFrame) -> pl.DataFrame:
    """The frame with `member_status` set to the member's status at each row's time where
    it was away then (unenrolled or opted out, and not yet back).

    `frame` has member_id, member_status (the current status) and timestamp. Only rows of
    members active now change: a member away now earns nothing anyway. A row takes the last
    change at or before its time (a change at the same instant counts; changes at the same
    instant are ordered by id, which follows creation time); a row before the member's first
    recorded change keeps the current status, as before this history existed. A `merged`
    change is not an away period: the events of a merged-away profile are the survivor's.

    Members who never left are not looked at: who ever left is read first (one index probe;
    for a large batch, once for the whole programme), and when none of the batch's members
    did, that is all it costs. Only the leavers' histories are read, and only their rows
    are matched, with one as-of join.
    """
    if frame.is_empty():
        return frame
    active = pl.col("member_status") == "active"
    if frame.height > ledger.IN_LIST_LIMIT:
        left = leavers(session, program_id=program_id, members=None)
        if left.is_empty():
            return frame
        left = left.filter(left.is_in(frame.filter(active)["member_id"].implode()))
    else:
        members = frame.filter(active)["member_id"].unique()
        left = leavers(session, program_id=program_id, members=members)
    if left.is_empty():
        return frame
    changes = history(session, members=left.to_list())
    indexed = frame.with_row_index("_status_row")
    rows = (
        indexed.filter(active & pl.col("member_id").is_in(left.implode()))
        .select("_status_row", "member_id", pl.col("timestamp").dt.cast_time_unit("us"))
        .sort("timestamp")
    )
    changes = (
        changes.sort("at", "id")
        .unique(["member_id", "at"], keep="last", maintain_order=True)
        .select("member_id", "at", "status")
    )
    # Both sides are sorted by time just above (Polars cannot verify it within groups).
    matched = rows.join_asof(
        changes,
        left_on="timestamp",
        right_on="at",
        by="member_id",
        strategy="backward",
        check_sortedness=False,
    )
    away = matched.filter(pl.col("status").is_in(AWAY)).select(
        "_status_row", pl.col("status").alias("_away")
    )
    if away.is_empty():
        return frame
    logger.debug("%d events fall in their members' away periods", away.height)
    return (
        indexed.join(away, on="_status_row", how="left", maintain_order="left")
        .with_columns(pl.coalesce("_away", "member_status").alias("member_status"))
        .drop("_status_row", "_away")
    )
