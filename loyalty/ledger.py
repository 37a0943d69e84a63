"""The points ledger: append-only entries, lots, FIFO spending and derived balances.

Every credit is an entry plus a lot holding its points; every debit is an entry plus the
draws it took from lots, soonest expiry first. So at all times, for every member, the sum of
the entries' points equals the sum of the lots' remaining points, and no lot goes below 0.
Each entry carries an idempotency key under a unique constraint: writing the same key twice
is a no-op (`INSERT ... ON CONFLICT DO NOTHING`), whoever writes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import polars as pl
from psycopg import sql
from sqlalchemy import (
    Column,
    Index,
    Insert,
    MetaData,
    Table,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.schema import CreateIndex, CreateTable, DropIndex

from cdp.db import utcnow, uuid_text
from loyalty import calendar
from loyalty.errors import InsufficientPoints
from loyalty.models import Activity, LedgerEntry, Lot, LotDraw, Member, Program

logger = logging.getLogger(__name__)

CREDIT_KINDS = frozenset({"earn", "adjust", "import", "refund", "merge", "bonus"})

ENTRY_COLUMNS = (
    "id",
    "program_id",
    "member_id",
    "kind",
    "points",
    "qualifying_points",
    "unrecovered",
    "status",
    "pending_until",
    "expires_at",
    "occurred_at",
    "local_date",
    "created_at",
    "event_id",
    "message_id",
    "order_id",
    "rule_id",
    "redemption_id",
    "reason",
    "actor",
    "idempotency_key",
)


ENTRY_NAMESPACE = uuid.UUID("4f1f7c1e-2b7a-4d8e-9a57-3f0c1d2b9e10")


def entry_id(key: str) -> str:
    """The id of the entry written under an idempotency key: the same key, the same id,
    so the FIFO tie-break between lots of the same instant is the same on every path."""
    return str(uuid.uuid5(ENTRY_NAMESPACE, key))


def ordered_ids(keys: Sequence[str], millis: Sequence[int]) -> list[str]:
    """Ids that sort by time: for each key and its instant (Unix milliseconds), a UUIDv8
    (RFC 9562, custom) whose first 48 bits are the instant and the other 74 free bits the
    SHA-1 of the key in `ENTRY_NAMESPACE`. The same key at the same instant gives the same id.

    Credits take these (other rows take `cdp.db.new_id`, a UUIDv7). Written in time order,
    as a backfill and real time write them, their ids land at the end of the primary-key
    B-trees of the entries and lots instead of at random places, and the lots' foreign-key
    checks find their entry among the pages just written. Measured on the 100k sample's
    852k credits: lots written in 4.0 s instead of 8.1 s, entries 10.1 s instead of 11.1 s.
    """
    base = hashlib.sha1(ENTRY_NAMESPACE.bytes, usedforsecurity=False)
    out: list[str] = []
    for key, ms in zip(keys, millis, strict=True):
        digest = base.copy()
        digest.update(key.encode())
        low = int.from_bytes(digest.digest()[:10], "big")  # 80 bits, 74 kept
        n = (min(max(ms, 0), 0xFFFF_FFFF_FFFF) << 80) | (8 << 76)  # instant, version 8
        n |= ((low >> 62) & 0xFFF) << 64  # 12 bits
        n |= (0b10 << 62) | (low & ((1 << 62) - 1))  # RFC variant, 62 bits
        out.append(uuid_text(n))
    return out


T = TypeVar("T")


# Above this many members or profiles in a batch, a read takes the whole programme's rows
# in one statement instead of the batch's in chunks of bound ids.
IN_LIST_LIMIT = 5_000


def unindexed(column: Any) -> Any:  # Any: a column, and the same column in an expression
    """The column inside an expression no index serves (`coalesce(c, c)`), so the planner
    cannot pick an index on it: SQLite otherwise walks an index on a range or a GROUP BY
    column and fetches every row at a random place in the table, minutes at millions of
    rows, where a read by another index (a list of members) or one scan and a sort is fast.
    Used where that was measured (1M members, 8.5M entries and lots)."""
    return func.coalesce(column, column)


def in_chunks(values: Sequence[T], size: int = 1000) -> list[list[T]]:
    """`values` in lists of at most `size`: the bound parameters of one `IN (...)`."""
    return [list(values[i : i + size]) for i in range(0, len(values), size)]


def insert_ignoring_conflicts(session: Session, table: Any) -> Insert:  # Any: a Table
    """`INSERT ... ON CONFLICT DO NOTHING` for the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"no conflict-ignoring insert for {dialect}")


def lock_member(session: Session, *, member_id: str) -> None:
    """Serialise every balance-changing transaction of a member until this one commits.

    PostgreSQL: `SELECT ... FOR UPDATE` on the member row. SQLite: bump the row's `lock_seq`;
    the first write of a SQLite transaction takes the database's write lock, held until
    commit, and pysqlite opens the transaction only at that write, so every read after it
    sees the latest committed state.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Member.id).where(Member.id == member_id).with_for_update())
    else:
        session.execute(
            update(Member).where(Member.id == member_id).values(lock_seq=Member.lock_seq + 1)
        )


# From this many rows, PostgreSQL bulk inserts go through COPY (1.6x faster than the
# driver's executemany for 100k ledger entries); below, the four statements it takes cost
# more than they save.
COPY_MIN_ROWS = 1000


def bulk_insert(session: Session, table: Any, frame: pl.DataFrame) -> int:  # Any: a Table
    """`INSERT ... ON CONFLICT DO NOTHING` of a frame's rows in one driver `executemany`.

    The statement is compiled once by SQLAlchemy; the rows go straight to the driver, which
    avoids SQLAlchemy's per-row parameter processing (5-10x faster on large batches).
    Values are converted in Polars the way SQLAlchemy would store them (SQLite: UTC text
    timestamps and ISO dates). Returns how many rows were new.
    """
    if frame.is_empty():
        return 0
    frame = _without_null_columns(table, frame)
    columns = frame.columns
    stmt = insert_ignoring_conflicts(session, table).values(
        {name: bindparam(name) for name in columns}
    )
    dialect = session.get_bind().dialect
    compiled = stmt.compile(dialect=dialect)
    connection = session.connection()
    if dialect.name == "postgresql" and frame.height >= COPY_MIN_ROWS:
        return _copy_insert(session, table, frame)
    if dialect.name != "sqlite":
        result = connection.exec_driver_sql(str(compiled), frame.to_dicts())
        return max(int(result.rowcount), 0)
    # Large batches insert into several B-trees at random places (the idempotency key, caps,
    # orders): SQLite's default 2 MB page cache thrashes.
    with large_cache(session):
        values = _sqlite_values(frame)
        # Tuples zipped from whole columns as the driver asks for them: a quarter less time
        # than building every row first with `DataFrame.rows()` (852k entries: 3.0 / 4.0 s).
        # SQLAlchemy wants a list of them; the driver's cursor takes the iterator.
        lists = [values[name].to_list() for name in compiled.positiontup or []]
        driver: Any = connection.connection.dbapi_connection  # Any: the sqlite3 connection
        if frame.height > SQLITE_MULTI_ROW_MAX:
            cursor = driver.cursor()
            try:
                cursor.executemany(str(compiled), zip(*lists, strict=True))
                inserted = int(cursor.rowcount)
            finally:
                cursor.close()
        else:
            inserted = _sqlite_insert_rows(driver, str(compiled), lists)
    return max(inserted, 0)


# Rows per multi-row INSERT on SQLite (fewer if the driver's bound-parameter limit is lower).
SQLITE_ROWS_PER_INSERT = 500
# Above this many rows, SQLite bulk inserts use `executemany` (a backfill's batches): at rest
# it writes large batches faster (100k-customer backfill: credits 12.2-12.3 s a batch of
# 167k events, against 15.7-17.7 s in multi-row statements), and a backfill's batch is not
# the latency-bound work of a busy server's real-time job.
SQLITE_MULTI_ROW_MAX = 20_000


def _sqlite_insert_rows(driver: Any, statement: str, columns: list[list[Any]]) -> int:
    # Any: the sqlite3 connection, and column values
    """Insert rows, given as whole columns, with `statement` (a single-row `INSERT ... VALUES (?,
    ...)`) made multi-row; how many rows were new.

    Not `executemany`: Python's sqlite3 releases the GIL around every row it steps, and a
    thread that wants the GIL back waits for the thread holding it to reach its switch
    interval. In the server, with request threads busy, inserting 5,000 ledger rows that way
    took seconds instead of milliseconds (the convoy effect); a statement per
    `SQLITE_ROWS_PER_INSERT` rows hands the GIL over that many times fewer.
    """
    width = len(columns)
    group = "(" + ", ".join("?" * width) + ")"
    if width == 0 or statement.count(group) != 1:
        raise ValueError(f"expected one row of {width} parameters in {statement!r}")
    limit = driver.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per = max(1, min(SQLITE_ROWS_PER_INSERT, limit // width))
    rows = list(zip(*columns, strict=True))
    cursor = driver.cursor()
    inserted = 0
    try:
        for start in range(0, len(rows), per):
            chunk = rows[start : start + per]
            cursor.execute(
                statement.replace(group, ", ".join([group] * len(chunk))),
                [value for row in chunk for value in row],
            )
            inserted += max(int(cursor.rowcount), 0)
    finally:
        cursor.close()
    return inserted


def _large_cache_kib() -> int:
    """SQLite's page cache for bulk work, in KiB (its default is 2 MB): a quarter of the
    machine's memory, at least 1 GiB and at most 4 GiB. SQLite takes pages as it needs them,
    so a small store never holds that much."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 1 << 20
    return max(1 << 20, min(4 << 20, total // 4 // 1024))


LARGE_CACHE_KIB = _large_cache_kib()


@contextmanager
def large_cache(session: Session) -> Iterator[None]:
    """SQLite: a large page cache (`LARGE_CACHE_KIB`) on the session's connection for the
    block; the pooled connection gets its own setting back after it (and frees the pages).
    A block inside another keeps the outer one's cache. A backfill holds it from its first
    read to its last write, so the pages one step reads or writes (the ledger's indexes,
    the members) are still there for the next step and the next slice: at 1M customers the
    write rate no longer falls slice after slice, and reading caps, refunds and members
    stays cheap (docs/loyalty.md, third round)."""
    if session.get_bind().dialect.name != "sqlite":
        yield
        return
    connection = session.connection()
    previous = int(connection.exec_driver_sql("PRAGMA cache_size").scalar_one())
    if previous == -LARGE_CACHE_KIB:
        yield
        return
    connection.exec_driver_sql(f"PRAGMA cache_size=-{LARGE_CACHE_KIB}")
    try:
        yield
    finally:
        connection.exec_driver_sql(f"PRAGMA cache_size={previous}")


def _without_null_columns(table: Any, frame: pl.DataFrame) -> pl.DataFrame:  # Any: a Table
    """The frame without its all-null columns that would be NULL anyway (nullable, no
    default): fewer values to build, bind and free per row (earn entries leave five of
    their 21 columns empty), the same rows stored."""
    empty = [
        name
        for name in frame.columns
        if frame[name].null_count() == frame.height
        and table.c[name].nullable
        and table.c[name].default is None
        and table.c[name].server_default is None
    ]
    return frame.drop(empty) if empty else frame


def _staging(table: Any) -> Table:  # Any: a Table
    """A temporary table with the columns of `table` (no keys, no constraints), dropped at
    the end of the transaction."""
    return Table(
        f"{table.name}_staging",
        MetaData(),
        *(Column(c.name, c.type, nullable=True) for c in table.columns),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )


def _copy_insert(session: Session, table: Any, frame: pl.DataFrame) -> int:  # Any: a Table
    """PostgreSQL: `COPY` the rows into a temporary table, then one `INSERT ... SELECT ...
    ON CONFLICT DO NOTHING` into `table` (COPY alone cannot skip conflicting keys).
    Returns how many rows were new."""
    staging = _staging(table)
    connection = session.connection()
    connection.execute(CreateTable(staging, if_not_exists=True))
    connection.execute(delete(staging))
    driver: Any = connection.connection.dbapi_connection  # Any: the psycopg connection
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(staging.name), sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    )
    with driver.cursor() as cursor, cursor.copy(statement) as copy:
        for row in frame.iter_rows():
            copy.write_row(row)
    stmt = insert_ignoring_conflicts(session, table).from_select(
        frame.columns,
        select(*(staging.c[name] for name in frame.columns)),
        include_defaults=False,
    )
    # Compiled without parameters (every value comes from the staging table); run as the
    # driver's statement, whose row count psycopg reports (SQLAlchemy's result gives -1).
    result = connection.exec_driver_sql(str(stmt.compile(dialect=connection.dialect)))
    return max(int(result.rowcount), 0)


def _sqlite_values(frame: pl.DataFrame) -> pl.DataFrame:
    converted = []
    for name, dtype in frame.schema.items():
        column = pl.col(name)
        if isinstance(dtype, pl.Datetime):
            if dtype.time_zone is not None:
                column = column.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            column = column.dt.to_string("%Y-%m-%d %H:%M:%S.%6f")
        elif dtype == pl.Date:
            column = column.dt.to_string("%Y-%m-%d")
        elif dtype == pl.Boolean:
            column = column.cast(pl.Int64)
        converted.append(column.alias(name))
    return frame.select(converted)


# Indexes that no query of a backfill reads (checked with EXPLAIN QUERY PLAN over every
# statement the tests issue): the dashboards' ledger-by-time index and the lots by programme
# (expiry, KPIs). The members' indexes of entries and activity are read by the tier metrics,
# so they are deferrable only for a programme without tiers. The unique keys (entry ids,
# idempotency keys) and the indexes the backfill reads (caps and limits, refunds by order,
# lots by member) are never deferred.
DEFERRABLE_INDEXES = ("ix_loyalty_ledger_entry_occurred", "ix_loyalty_lot_program_id")
MEMBER_INDEXES = ("ix_loyalty_ledger_entry_member_created", "ix_loyalty_activity_member_id")


def _indexes(names: Sequence[str]) -> list[Index]:
    found = {
        index.name: index
        for table in (LedgerEntry.__table__, Lot.__table__, Activity.__table__)
        for index in table.indexes  # type: ignore[attr-defined]
    }
    return [found[name] for name in names]


def entry_rows_estimate(session: Session) -> int:
    """About how many entries the ledger holds, all programmes (SQLite: the largest rowid,
    one B-tree descent instead of a count; at least the count)."""
    if session.get_bind().dialect.name != "sqlite":
        return int(session.scalar(select(func.count()).select_from(LedgerEntry)) or 0)
    found = session.connection().exec_driver_sql("SELECT max(rowid) FROM loyalty_ledger_entry")
    return int(found.scalar() or 0)


@contextmanager
def deferred_indexes(session: Session, *, names: Sequence[str]) -> Iterator[list[str]]:
    """Drop these secondary indexes for a bulk write and build them again after it, all in
    the caller's transaction; yields the names dropped.

    SQLite only (elsewhere a no-op): building an index from sorted keys costs far less than
    inserting millions of rows into it at random places. SQLite's DDL is transactional and
    a database has one writer: the write lock is taken first (`BEGIN IMMEDIATE` unless a
    transaction is open: pysqlite opens one only at a write, and would run a DDL statement
    outside it), other
    connections keep reading the committed schema, indexes included, until the commit, and
    a failure rolls the drop back with everything else (the caller's unit of work rolls
    back on error; the indexes are then not built again here). On PostgreSQL a dropped index
    would lock every reader of the table out until the commit, so nothing is deferred there.
    """
    if session.get_bind().dialect.name != "sqlite" or not names:
        yield []
        return
    connection = session.connection()
    driver = connection.connection.dbapi_connection
    if driver is not None and not driver.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    indexes = _indexes(names)
    for index in indexes:
        connection.execute(DropIndex(index, if_exists=True))
    yield [str(index.name) for index in indexes]
    started = time.perf_counter()
    with large_cache(session):
        for index in indexes:
            connection.execute(CreateIndex(index))
    logger.debug("built %d deferred indexes in %.2f s", len(indexes), time.perf_counter() - started)


@dataclass(slots=True)
class Credit:
    """A credit to write: one entry and its lot."""

    member_id: str
    kind: str
    points: int
    occurred_at: datetime
    idempotency_key: str
    qualifying_points: int = 0
    event_id: int | None = None
    message_id: str | None = None
    order_id: str | None = None
    rule_id: str | None = None
    redemption_id: str | None = None
    reason: str | None = None
    actor: str | None = None
    # Set to override the programme's policy (imports carry their own expiry).
    expires_at: datetime | None = None
    pending: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # Any: JSON-like extras


def credit_frame(program: Program, frame: pl.DataFrame) -> pl.DataFrame:
    """Add local date, pending end and expiry (programme policy) to a frame of credits."""
    return calendar.with_local_dates(
        frame,
        at="occurred_at",
        tz=program.timezone,
        pending_days=program.pending_days,
        policy=program.expiry_policy,
        months=program.expiry_months,
    )


@dataclass(frozen=True, slots=True)
class Written:
    """What a bulk write of credits added to the ledger: new entries and their points."""

    entries: int = 0
    points: int = 0


def write_credits(
    session: Session, *, program: Program, frame: pl.DataFrame, now: datetime | None = None
) -> int:
    """Write credit entries and their lots in bulk; keys already written are skipped.

    `frame` holds member_id, kind, points, qualifying_points, occurred_at, idempotency_key
    and optionally event_id, message_id, order_id, rule_id, reason, actor, and an
    `expires_override` / `no_pending` pair. Returns how many entries were new.
    """
    return write_credits_counted(session, program=program, frame=frame, now=now).entries


def write_credits_counted(
    session: Session, *, program: Program, frame: pl.DataFrame, now: datetime | None = None
) -> Written:
    """`write_credits`, returning the points of the new entries as well as their number."""
    if frame.is_empty():
        return Written()
    now = now or utcnow()
    dated = credit_frame(program, frame)
    if "expires_override" in dated.columns:
        dated = dated.with_columns(
            pl.coalesce(pl.col("expires_override"), pl.col("expires_at")).alias("expires_at")
        )
    if "no_pending" in dated.columns:
        dated = dated.with_columns(
            pl.when(pl.col("no_pending"))
            .then(None)
            .otherwise(pl.col("pending_until"))
            .alias("pending_until")
        )
    dated = dated.with_columns(
        pl.Series(
            "id",
            ordered_ids(
                dated["idempotency_key"].to_list(),
                dated["occurred_at"].dt.epoch("ms").to_list(),
            ),
            dtype=pl.String,
        ),
        pl.lit(program.id).alias("program_id"),
        pl.lit(0).alias("unrecovered"),
        pl.lit(now).dt.convert_time_zone("UTC").alias("created_at"),
        pl.when(pl.col("pending_until").is_not_null() & (pl.col("pending_until") > now))
        .then(pl.lit("pending"))
        .otherwise(pl.lit("active"))
        .alias("status"),
    )
    for name in ENTRY_COLUMNS:
        if name not in dated.columns:
            dated = dated.with_columns(pl.lit(None).alias(name))
    entries = dated.select(ENTRY_COLUMNS).with_columns(
        pl.col("event_id").cast(pl.Int64),
        pl.col(["message_id", "order_id", "rule_id", "redemption_id", "reason", "actor"]).cast(
            pl.String
        ),
        pl.col(["pending_until", "expires_at", "occurred_at", "created_at"]).cast(
            pl.Datetime("us", "UTC")
        ),
    )
    inserted = bulk_insert(session, LedgerEntry.__table__, entries)
    if not inserted:
        return Written()
    if inserted < entries.height:
        # Some keys were written already, maybe under another id (an entry written before
        # ids were ordered, or the same key at another instant): only the ids now in the
        # ledger get a lot, and an entry that existed with the same id has its lot already
        # (written with it), which the lot insert skips and the points written leave out.
        present, lotted = _written(session, entries["id"])
        entries = entries.filter(pl.col("id").is_in(present))
        new_points = entries.filter(~pl.col("id").is_in(lotted) & (pl.col("points") > 0))
    else:
        new_points = entries.filter(pl.col("points") > 0)
    lots = entries.filter(pl.col("points") > 0).select(
        pl.col("id").alias("entry_id"),
        "program_id",
        "member_id",
        "points",
        pl.col("points").alias("remaining"),
        pl.col("occurred_at").alias("earned_at"),
        "pending_until",
        "expires_at",
        "order_id",
    )
    bulk_insert(session, Lot.__table__, lots)
    return Written(entries=inserted, points=int(new_points["points"].sum()))


def _written(session: Session, ids: pl.Series) -> tuple[list[str], list[str]]:
    """Which of these entry ids the ledger holds, and which of those have a lot already (a
    credit's lot is written with it: those entries were there before this write)."""
    present: list[str] = []
    lotted: list[str] = []
    for chunk in in_chunks(ids.unique().to_list()):
        for found, lot in session.execute(
            select(LedgerEntry.id, Lot.entry_id)
            .outerjoin(Lot, Lot.entry_id == LedgerEntry.id)
            .where(LedgerEntry.id.in_(chunk))
        ).all():
            present.append(found)
            if lot is not None:
                lotted.append(found)
    return present, lotted


def credit(
    session: Session, *, program: Program, credit: Credit, now: datetime | None = None
) -> LedgerEntry:
    """Write one credit (or find the entry already written under its key)."""
    row: dict[str, Any] = {  # Any: column values
        "member_id": credit.member_id,
        "kind": credit.kind,
        "points": credit.points,
        "qualifying_points": credit.qualifying_points,
        "occurred_at": credit.occurred_at,
        "idempotency_key": credit.idempotency_key,
        "event_id": credit.event_id,
        "message_id": credit.message_id,
        "order_id": credit.order_id,
        "rule_id": credit.rule_id,
        "redemption_id": credit.redemption_id,
        "reason": credit.reason,
        "actor": credit.actor,
        "expires_override": credit.expires_at,
        "no_pending": not credit.pending,
    }
    schema: dict[str, pl.DataType] = {
        "occurred_at": pl.Datetime("us", "UTC"),
        "expires_override": pl.Datetime("us", "UTC"),
        "event_id": pl.Int64(),
        "points": pl.Int64(),
        "qualifying_points": pl.Int64(),
    }
    frame = pl.DataFrame([row], schema_overrides=schema)
    write_credits(session, program=program, frame=frame, now=now)
    entry = find_entry(session, key=credit.idempotency_key)
    assert entry is not None
    return entry


def find_entry(session: Session, *, key: str) -> LedgerEntry | None:
    """The entry written under an idempotency key, if any."""
    return session.scalar(select(LedgerEntry).where(LedgerEntry.idempotency_key == key))


def _spendable(now: datetime, *, include_pending: bool) -> Any:  # Any: SQL expression
    live = or_(Lot.expires_at.is_(None), Lot.expires_at > now)
    if include_pending:
        return live
    return and_(live, or_(Lot.pending_until.is_(None), Lot.pending_until <= now))


def _fifo_order() -> tuple[Any, ...]:  # Any: SQL order expressions
    return (Lot.expires_at.is_(None), Lot.expires_at, Lot.earned_at, Lot.entry_id)


def debit(
    session: Session,
    *,
    program: Program,
    member_id: str,
    kind: str,
    points: int,
    idempotency_key: str,
    occurred_at: datetime | None = None,
    now: datetime | None = None,
    qualifying_points: int = 0,
    lots: Sequence[str] | None = None,
    order_id: str | None = None,
    include_pending: bool = False,
    partial: bool = False,
    as_of: datetime | None = None,
    event_id: int | None = None,
    message_id: str | None = None,
    rule_id: str | None = None,
    redemption_id: str | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> LedgerEntry:
    """Take points from the member's lots, soonest expiry first, and record the draws.

    The caller holds the member's lock (`lock_member`). `lots` restricts the draw to those
    lots (expiry); `order_id` draws first from the lots that order earned, whatever their
    state, then from the others (reversals). `as_of` judges the other lots at that instant
    (a refund draws on the lots alive when it happened, so a backfill over history gives
    what real time gave); default now. With `partial`, what the balance cannot cover is
    recorded as `unrecovered` instead of failing. Writing an existing key returns the
    entry already written.
    """
    existing = find_entry(session, key=idempotency_key)
    if existing is not None:
        return existing
    now = now or utcnow()
    occurred_at = occurred_at or now
    plan: list[tuple[str, int]] = []
    left = points
    if order_id is not None:
        own = session.execute(
            select(Lot.entry_id, Lot.remaining)
            .where(Lot.member_id == member_id, Lot.order_id == order_id, Lot.remaining > 0)
            .order_by(*_fifo_order())
        ).all()
        for lot_id, remaining in own:
            if left <= 0:
                break
            take = min(left, int(remaining))
            plan.append((lot_id, take))
            left -= take
    if left > 0:
        query = select(Lot.entry_id, Lot.remaining).where(
            Lot.member_id == member_id, Lot.remaining > 0
        )
        if lots is not None:
            query = query.where(Lot.entry_id.in_(list(lots)))
        else:
            query = query.where(_spendable(as_of or now, include_pending=include_pending))
            if as_of is not None:
                query = query.where(Lot.earned_at <= as_of)
        taken = {lot_id for lot_id, _ in plan}
        for lot_id, remaining in session.execute(query.order_by(*_fifo_order())).all():
            if left <= 0:
                break
            if lot_id in taken:
                continue
            take = min(left, int(remaining))
            plan.append((lot_id, take))
            left -= take
    if left > 0 and not partial:
        raise InsufficientPoints(
            f"the balance covers {points - left} of the {points} points needed",
            details={"needed": points, "available": points - left},
        )
    taken_total = points - left
    entry = LedgerEntry(
        id=entry_id(idempotency_key),
        program_id=program.id,
        member_id=member_id,
        kind=kind,
        points=-taken_total,
        qualifying_points=qualifying_points,
        unrecovered=left,
        status="active",
        occurred_at=occurred_at,
        local_date=calendar.local_date(occurred_at, program.timezone),
        created_at=now,
        event_id=event_id,
        message_id=message_id,
        order_id=order_id,
        rule_id=rule_id,
        redemption_id=redemption_id,
        reason=reason,
        actor=actor,
        idempotency_key=idempotency_key,
    )
    session.add(entry)
    session.flush()
    _apply_draws(session, entry_id=entry.id, draws=plan)
    return entry


def _apply_draws(session: Session, *, entry_id: str, draws: Sequence[tuple[str, int]]) -> None:
    """Record draws and move the lots' remaining points; positive takes, negative gives back."""
    for lot_id, amount in draws:
        if amount == 0:
            continue
        result = session.execute(
            update(Lot)
            .where(Lot.entry_id == lot_id, Lot.remaining >= amount)
            .values(remaining=Lot.remaining - amount)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise RuntimeError(f"lot {lot_id} cannot give {amount} points")
        session.add(LotDraw(entry_id=entry_id, lot_id=lot_id, points=amount))
    session.flush()


@dataclass(slots=True)
class LotState:
    """A lot held in memory while many debits are planned at once (`plan_reversal`)."""

    entry_id: str
    order_id: str | None
    remaining: int
    earned_at: datetime
    expires_at: datetime | None

    def fifo_key(self) -> tuple[bool, datetime, datetime, str]:
        """The order `debit` draws in: soonest expiry first (never last), then age, then id."""
        return (
            self.expires_at is None,
            self.expires_at or self.earned_at,
            self.earned_at,
            self.entry_id,
        )


def lots_of_members(session: Session, *, member_ids: Sequence[str]) -> dict[str, list[LotState]]:
    """The lots with points left of these members (their current owners), by member.

    The caller holds the members' locks (`lock_members`)."""
    found: dict[str, list[LotState]] = {m: [] for m in member_ids}
    ids = sorted(set(member_ids))
    for chunk in in_chunks(ids):
        rows = session.execute(
            select(
                Lot.member_id,
                Lot.entry_id,
                Lot.order_id,
                Lot.remaining,
                Lot.earned_at,
                Lot.expires_at,
            ).where(Lot.member_id.in_(chunk), Lot.remaining > 0)
        ).all()
        for member_id, lot_id, order_id, remaining, earned_at, expires_at in rows:
            found[member_id].append(
                LotState(lot_id, order_id, int(remaining), earned_at, expires_at)
            )
    return found


def lock_members(session: Session, *, member_ids: Sequence[str]) -> None:
    """`lock_member` for many members at once (in id order, so two writers cannot deadlock)."""
    ids = sorted(set(member_ids))
    for chunk in in_chunks(ids):
        if session.get_bind().dialect.name == "postgresql":
            session.execute(
                select(Member.id).where(Member.id.in_(chunk)).order_by(Member.id).with_for_update()
            )
        else:
            session.execute(
                update(Member).where(Member.id.in_(chunk)).values(lock_seq=Member.lock_seq + 1)
            )


def plan_reversal(
    lots: list[LotState], *, points: int, order_id: str, as_of: datetime
) -> tuple[list[tuple[str, int]], int]:
    """The draws `debit(order_id=, include_pending=True, partial=True, as_of=)` would make,
    on lots held in memory (updated in place): the order's own lots first, whatever their
    state, then the member's other lots alive and earned at `as_of`. Returns the draws and
    what the lots could not cover."""
    own = sorted(
        (lot for lot in lots if lot.order_id == order_id and lot.remaining > 0),
        key=LotState.fifo_key,
    )
    own_ids = {lot.entry_id for lot in own}
    others = sorted(
        (
            lot
            for lot in lots
            if lot.remaining > 0
            and lot.entry_id not in own_ids
            and (lot.expires_at is None or lot.expires_at > as_of)
            and lot.earned_at <= as_of
        ),
        key=LotState.fifo_key,
    )
    plan: list[tuple[str, int]] = []
    left = points
    for lot in (*own, *others):
        if left <= 0:
            break
        take = min(left, lot.remaining)
        plan.append((lot.entry_id, take))
        lot.remaining -= take
        left -= take
    return plan, left


def write_debits(session: Session, *, entries: pl.DataFrame, draws: pl.DataFrame) -> int:
    """Write debit entries (all `ENTRY_COLUMNS`), their draws (entry_id, lot_id, points > 0)
    and the lots' new remaining points in bulk. The caller holds the members' locks and
    planned the draws on the lots as they are (`plan_reversal`). Returns the entries written.
    """
    if entries.is_empty():
        return 0
    written = bulk_insert(session, LedgerEntry.__table__, entries.select(ENTRY_COLUMNS))
    if written != entries.height:
        raise RuntimeError("a debit planned in bulk was written meanwhile; retry the batch")
    if draws.is_empty():
        return written
    bulk_insert(session, LotDraw.__table__, draws.select("entry_id", "lot_id", "points"))
    per_lot = draws.group_by("lot_id").agg(pl.col("points").sum().alias("amount"))
    stmt = (
        update(Lot)
        .where(Lot.entry_id == bindparam("lot"), Lot.remaining >= bindparam("amount"))
        .values(remaining=Lot.remaining - bindparam("amount"))
    )
    result = session.connection().execute(
        stmt, [{"lot": i, "amount": a} for i, a in per_lot.iter_rows()]
    )
    dialect = session.get_bind().dialect
    if dialect.supports_sane_multi_rowcount and result.rowcount != per_lot.height:
        raise RuntimeError("a lot could not give the points planned from it")
    return written


def draw_owners(session: Session, *, entry_id: str) -> list[str]:
    """The members that now hold the lots a debit drew on (a merge or split moves lots)."""
    return sorted(
        session.scalars(
            select(Lot.member_id)
            .join(LotDraw, LotDraw.lot_id == Lot.entry_id)
            .where(LotDraw.entry_id == entry_id)
            .distinct()
        ).all()
    )


def give_back(
    session: Session,
    *,
    program: Program,
    original: LedgerEntry,
    member_id: str,
    kind: str,
    idempotency_key: str,
    now: datetime | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> LedgerEntry:
    """Undo a debit: return its points to the very lots it drew on (a cancelled redemption).

    The points are credited to whoever holds each lot now, not to the debit's member: a
    merge since the debit moved the lots to the survivor (a split, to another member), and
    each member's entries must still sum to its lots. `member_id` (the debit's member, or
    the survivor it was merged into) takes the entry keyed `idempotency_key`, and the
    qualifying points; a lot held by another member gives that member an entry of its own,
    keyed `<idempotency_key>:<member id>`. Returns the first entry.

    A lot that expired in between gets its points back expired; the expiry job takes them.
    """
    existing = find_entry(session, key=idempotency_key)
    if existing is not None:
        return existing
    now = now or utcnow()
    draws = session.execute(
        select(Lot.member_id, LotDraw.lot_id, func.sum(LotDraw.points))
        .join(Lot, Lot.entry_id == LotDraw.lot_id)
        .where(LotDraw.entry_id == original.id)
        .group_by(Lot.member_id, LotDraw.lot_id)
        .order_by(LotDraw.lot_id)
    ).all()
    back: dict[str, list[tuple[str, int]]] = {}
    for owner, lot_id, total in draws:
        if total:
            back.setdefault(owner, []).append((lot_id, -int(total)))
    if member_id not in back:
        # Every lot left this member (or it drew nothing): the first holder takes the key.
        member_id = min(back, default=member_id)
    owners = [member_id, *sorted(set(back) - {member_id})]
    local = calendar.local_date(now, program.timezone)
    entries: list[LedgerEntry] = []
    for owner in owners:
        lots = back.get(owner, [])
        key = idempotency_key if owner == member_id else f"{idempotency_key}:{owner}"
        entry = LedgerEntry(
            id=entry_id(key),
            program_id=program.id,
            member_id=owner,
            kind=kind,
            points=-sum(amount for _, amount in lots),
            qualifying_points=-original.qualifying_points if owner == member_id else 0,
            unrecovered=0,
            status="active",
            occurred_at=now,
            local_date=local,
            created_at=now,
            redemption_id=original.redemption_id,
            reason=reason,
            actor=actor,
            idempotency_key=key,
        )
        session.add(entry)
        session.flush()
        _apply_draws(session, entry_id=entry.id, draws=lots)
        entries.append(entry)
    return entries[0]


@dataclass(frozen=True, slots=True)
class Expiring:
    """Points that expire on a local date."""

    date: date
    expires_at: datetime
    points: int


@dataclass(frozen=True, slots=True)
class BalanceView:
    """A member's balance, derived from the lots at an instant."""

    active: int
    pending: int
    expired_unprocessed: int
    total: int
    expiring_soon: list[Expiring]
    next_pending_release: datetime | None


def balance(
    session: Session,
    *,
    program: Program,
    member_id: str,
    now: datetime | None = None,
    soon_days: int = 30,
) -> BalanceView:
    """Active (spendable), pending and soon-expiring points of a member, from the lots."""
    now = now or utcnow()
    rows = session.execute(
        select(Lot.remaining, Lot.pending_until, Lot.expires_at).where(
            Lot.member_id == member_id, Lot.remaining > 0
        )
    ).all()
    active = pending = expired = 0
    soon: dict[datetime, int] = {}
    release: datetime | None = None
    horizon = now + timedelta(days=soon_days)
    for remaining, pending_until, expires_at in rows:
        points = int(remaining)
        if expires_at is not None and expires_at <= now:
            expired += points
            continue
        if pending_until is not None and pending_until > now:
            pending += points
            release = pending_until if release is None else min(release, pending_until)
        else:
            active += points
        if expires_at is not None and expires_at <= horizon:
            soon[expires_at] = soon.get(expires_at, 0) + points
    expiring = [
        Expiring(
            date=calendar.local_date(at - timedelta(microseconds=1), program.timezone),
            expires_at=at,
            points=points,
        )
        for at, points in sorted(soon.items())
    ]
    return BalanceView(
        active=active,
        pending=pending,
        expired_unprocessed=expired,
        total=active + pending + expired,
        expiring_soon=expiring,
        next_pending_release=release,
    )


def entries_sum(session: Session, *, member_id: str) -> int:
    """The sum of the points of the entries written for a member (the ledger's own total)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.points), 0)).where(
                LedgerEntry.member_id == member_id
            )
        )
        or 0
    )


def lots_sum(session: Session, *, member_id: str) -> int:
    """The sum of the remaining points of the member's lots."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(Lot.remaining), 0)).where(Lot.member_id == member_id)
        )
        or 0
    )


# Lots expired per statement batch: a few bound lists of this many ids, well under SQLite's
# 32,766 and PostgreSQL's 65,535 variables.
EXPIRY_CHUNK = 10_000

_UTC = pl.Datetime("us", "UTC")
# Polars types of `ENTRY_COLUMNS`, for entries written in bulk (`write_debits`).
ENTRY_SCHEMA: dict[str, pl.DataType] = {
    **dict.fromkeys(ENTRY_COLUMNS, pl.String()),
    **dict.fromkeys(("points", "qualifying_points", "unrecovered", "event_id"), pl.Int64()),
    **dict.fromkeys(("pending_until", "expires_at", "occurred_at", "created_at"), _UTC),
    "local_date": pl.Date(),
}


def expire_due(
    session: Session, *, program: Program, now: datetime | None = None, chunk: int = EXPIRY_CHUNK
) -> int:
    """Write an `expire` entry for every lot past its expiry that still holds points, drawing
    exactly what is left of it; returns how many were written.

    Set-based, `chunk` lots at a time: their members locked together (`lock_members`), the
    lots and what was drawn from them read in two statements, the entries, draws and lot
    updates written in bulk (`write_debits`). Each entry is the one `debit(kind="expire",
    lots=[lot], partial=True)` wrote per lot before: key `expire:<lot>:<drawn so far>`, id
    `entry_id(key)`, dated at the lot's expiry (a key already taken gets a suffix, see
    `expire_lots`).
    """
    now = now or utcnow()
    return sum(
        expire_lots(session, program=program, lot_ids=ids, now=now)
        for ids in in_chunks(due_lots(session, program=program, now=now), chunk)
    )


def due_lots(session: Session, *, program: Program, now: datetime) -> list[str]:
    """The ids of the programme's lots past their expiry at `now` that still hold points,
    sorted."""
    # Sorted here, not by SQL: an ORDER BY entry_id made SQLite walk the lots' primary key
    # and fetch every lot of the programme at a random place (minutes at 8.5M lots); without
    # it, one scan of the table.
    return sorted(
        session.scalars(
            select(Lot.entry_id).where(
                Lot.program_id == program.id,
                Lot.remaining > 0,
                Lot.expires_at.is_not(None),
                Lot.expires_at <= now,
            )
        )
    )


def expire_lots(session: Session, *, program: Program, lot_ids: list[str], now: datetime) -> int:
    """Expire these lots (ids from `due_lots`) as `expire_due` does; how many entries were
    written. Safe in a later transaction than the one that listed them: each lot is read
    again under its member's lock, and one spent or expired meanwhile is left alone."""
    locked = set(session.scalars(select(Lot.member_id).where(Lot.entry_id.in_(lot_ids))))
    lock_members(session, member_ids=sorted(locked))
    # Read again under the locks: what another writer left of each lot, and its owner now.
    lots = session.execute(
        select(Lot.entry_id, Lot.member_id, Lot.remaining, Lot.expires_at)
        .where(Lot.entry_id.in_(lot_ids), Lot.remaining > 0, Lot.expires_at <= now)
        .order_by(Lot.entry_id)
    ).all()
    moved = {member_id for _, member_id, _, _ in lots} - locked
    if moved:
        lock_members(session, member_ids=sorted(moved))
    drawn: dict[str, tuple[int, int]] = {
        lot_id: (int(total or 0), int(draws))
        for lot_id, total, draws in session.execute(
            select(LotDraw.lot_id, func.sum(LotDraw.points), func.count())
            .where(LotDraw.lot_id.in_(lot_ids))
            .group_by(LotDraw.lot_id)
        )
    }
    keys = {lot_id: f"expire:{lot_id}:{drawn.get(lot_id, (0, 0))[0]}" for lot_id, *_ in lots}
    existing = set(
        session.scalars(
            select(LedgerEntry.idempotency_key).where(
                LedgerEntry.idempotency_key.in_(list(keys.values()))
            )
        )
    )
    # Cancelled redemptions can give a lot back exactly what an earlier expiry saw drawn
    # (two redemptions of 30, expiry, one cancelled, expiry, the other cancelled): the key
    # is taken, and `debit` returned that old entry without drawing, so the expiry loop
    # never ended. Such a lot takes the number of its draws, which only grows, as a suffix.
    for lot_id, key in keys.items():
        if key in existing:
            keys[lot_id] = f"{key}:{drawn[lot_id][1]}"
            existing.discard(key)
            existing |= set(
                session.scalars(
                    select(LedgerEntry.idempotency_key).where(
                        LedgerEntry.idempotency_key == keys[lot_id]
                    )
                )
            )
    days: dict[datetime, date] = {}
    entries: list[dict[str, Any]] = []  # Any: column values
    draws: list[tuple[str, str, int]] = []
    for lot_id, member_id, remaining, expires_at in lots:
        key = keys[lot_id]
        if key in existing or expires_at is None:
            continue
        if expires_at not in days:
            days[expires_at] = calendar.local_date(expires_at, program.timezone)
        entry = entry_id(key)
        draws.append((entry, lot_id, int(remaining)))
        entries.append(
            {
                "id": entry,
                "program_id": program.id,
                "member_id": member_id,
                "kind": "expire",
                "points": -int(remaining),
                "qualifying_points": 0,
                "unrecovered": 0,
                "status": "active",
                "occurred_at": expires_at,
                "local_date": days[expires_at],
                "created_at": now,
                "reason": "points expired",
                "idempotency_key": key,
            }
        )
    return write_debits(
        session,
        entries=pl.DataFrame(entries, schema=ENTRY_SCHEMA),
        draws=pl.DataFrame(
            draws,
            schema={"entry_id": pl.String(), "lot_id": pl.String(), "points": pl.Int64()},
            orient="row",
        ),
    )
