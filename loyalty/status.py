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

from cdp.db import new_id
from loyalty import ledger
from loyalty.models import Member, MemberStatusChange

logger = logging.getLogger(__name__)

# Statuses of a member that left the programme for a while: it keeps its points but earns
# nothing, and its orders record no activity.
AWAY = ("unenrolled", "opted_out")
# Above this many members in a batch, the history of every member of the programme who ever
# left is read at once instead of the batch's members in chunks.
IN_LIST_LIMIT = 5_000

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
        pl.Series("id", [new_id() for _ in range(members.height)], dtype=pl.String),
        pl.lit(program_id).alias("program_id"),
        pl.col("member_id"),
        pl.lit(status).alias("status"),
        pl.col("at").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
        pl.lit(reason).alias("reason"),
    )
    return ledger.bulk_insert(session, MemberStatusChange.__table__, rows)


def leavers_history(session: Session, *, program_id: str, members: list[str]) -> pl.DataFrame:
    """Every recorded change of those of `members` who ever unenrolled or opted out.

    Columns member_id, id, status, at. Who ever left is read first from the (programme,
    status, member) index alone; members who never left are not read at all, and when none
    of the batch's members ever left, that one probe is all it costs.
    """
    if not members:
        return pl.DataFrame(schema=HISTORY_SCHEMA)
    change = MemberStatusChange
    left = select(change.member_id).where(change.program_id == program_id, change.status.in_(AWAY))
    if len(members) > IN_LIST_LIMIT:
        batch = set(members)
        leavers = sorted({m for m in session.scalars(left.distinct()) if m in batch})
    else:
        leavers = sorted(
            {
                found
                for chunk in ledger.in_chunks(sorted(members))
                for found in session.scalars(left.where(change.member_id.in_(chunk)))
            }
        )
    rows = [
        row
        for chunk in ledger.in_chunks(leavers)
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
    """
    if frame.is_empty():
        return frame
    active = frame.filter(pl.col("member_status") == "active")["member_id"].unique()
    history = leavers_history(session, program_id=program_id, members=active.to_list())
    if history.is_empty():
        return frame
    indexed = frame.with_row_index("_status_row")
    rows = (
        indexed.filter(
            (pl.col("member_status") == "active")
            & pl.col("member_id").is_in(history["member_id"].implode())
        )
        .select("_status_row", "member_id", pl.col("timestamp").dt.cast_time_unit("us"))
        .sort("timestamp")
    )
    changes = (
        history.sort("at", "id")
        .unique(["member_id", "at"], keep="last", maintain_order=True)
        .select("member_id", "at", "status")
    )
    matched = rows.join_asof(
        changes, left_on="timestamp", right_on="at", by="member_id", strategy="backward"
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
