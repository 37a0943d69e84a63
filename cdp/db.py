"""The operational store: SQLAlchemy engine, sessions and the declarative base."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import polars as pl
from fastapi import Depends, Request
from pydantic import AfterValidator
from sqlalchemy import (
    DateTime,
    Engine,
    Float,
    MetaData,
    QueuePool,
    Select,
    case,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from cdp.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every operational table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC that always comes back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Normalise to UTC before storing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Attach UTC to values read back without a zone."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """An instant in UTC; one without a zone is taken as UTC (the API's convention, and how
    the warehouse stores instants: naive UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# An instant in API models, in or out: marked UTC (ISO 8601 `Z`), naive values taken as UTC.
Instant = Annotated[datetime, AfterValidator(as_utc)]


def new_id() -> str:
    """A new identifier for an operational row: a UUIDv7 (RFC 9562), the current Unix
    millisecond in its first 48 bits and 74 random bits after it.

    Rows created one after the other get ids in (about) ascending order, so an insert lands
    at the end of its table's primary-key B-tree instead of at a random place: a bulk write
    of many rows (a loyalty backfill enrolling members and recording activity) touches the
    same few pages instead of the whole index. The random bits keep ids unguessable and
    unique across processes.
    """
    return new_ids(1)[0]


def new_ids(count: int) -> list[str]:
    """`count` new identifiers (`new_id`), their random bits drawn from the system in one
    call: a batch of rows (a real-time batch's memberships and activity) otherwise made a
    system call per id, each handing the GIL over, which in the busy server waits for
    another thread's switch interval."""
    millis = time.time_ns() // 1_000_000
    pool = os.urandom(10 * count)
    out: list[str] = []
    for i in range(count):
        bits = int.from_bytes(pool[10 * i : 10 * i + 10], "big")  # 80 random bits, 74 used
        n = millis << 80 | 7 << 76 | (bits >> 68) << 64
        n |= 0b10 << 62 | (bits & ((1 << 62) - 1))
        out.append(uuid_text(n))
    return out


def uuid_text(n: int) -> str:
    """The canonical text of the 128-bit UUID `n` (what `str(uuid.UUID(int=n))` gives,
    without building the object)."""
    x = f"{n:032x}"
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


# SQLite connections the pool keeps open: as many as the server's worker threads for sync
# endpoints (AnyIO's default limit, 40). With 5 kept, the connections a burst opened beyond
# them were closed on return and opened again by the next requests, each with its pragmas:
# under 1,000 events/s and ~100 API reads/s, 5.6% of the request threads' busy time.
SQLITE_POOL_KEPT = 40


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:  # Any: DB-API objects
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str | URL) -> Engine:
    """An engine for the operational store, with SQLite set up for concurrent use."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # No cap on the pool (`SQLITE_POOL_KEPT` kept open, more opened as needed, closed
        # when returned): a request holds its connection from its endpoint's worker thread
        # through the response's validation in another one (FastAPI), so with a capped pool a
        # burst could leave every worker thread waiting for a connection and every connection
        # waiting for a thread, and the server stopped answering
        # (tests/cdp/test_disconnects.py). A SQLite connection is a file handle; SQLite's own
        # lock orders the writers.
        in_file = bool(parsed.database) and parsed.database != ":memory:"
        pooling: dict[str, Any] = (  # Any: pool arguments
            {"poolclass": QueuePool, "pool_size": SQLITE_POOL_KEPT, "max_overflow": -1}
            if in_file
            else {}
        )
        engine = create_engine(
            parsed, connect_args={"timeout": 30, "check_same_thread": False}, **pooling
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    # Uncapped for the same reason (one server process per deployment: the warehouse has one
    # writer), so in-flight requests bound the connections, well under PostgreSQL's 100.
    return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=-1)


class Database:
    """The operational store of one process: its engine and session factory."""

    def __init__(self, url: str | URL) -> None:
        self.engine = make_engine(url)
        self.session_factory = sessionmaker(bind=self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """The store configured by the settings."""
        return cls(settings.db_url)

    def session(self) -> Session:
        """A new session; use as `with db.begin() as session:` for a unit of work."""
        return self.session_factory()

    def begin(self) -> AbstractContextManager[Session]:
        """A session in a transaction that commits on success and rolls back on error."""
        return self.session_factory.begin()

    def ping(self) -> None:
        """Raise if the store cannot answer a trivial query."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def checkpoint_wal(self, *, busy_ms: int = 250) -> WalCheckpoint | None:
        """SQLite: copy the write-ahead log into the database file and truncate it, waiting
        at most `busy_ms` for readers; None for other backends and in-memory stores.

        SQLite's automatic checkpoint after each commit only copies the frames no reader
        still needs, and the log restarts only once it was copied whole: under a steady
        stream of overlapping reads (API polls) and writes (real-time loyalty) that never
        happens, and the log grew by about 1 GB an hour, every page read searching a larger
        index. A TRUNCATE checkpoint briefly holds writers back until the readers of older
        frames are done; with a short wait it gives up (`busy`) instead of stalling them.
        """
        url = self.engine.url
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            return None
        with self.engine.connect() as connection:
            driver: Any = connection.connection.dbapi_connection  # Any: the sqlite3 connection
            driver.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
            try:
                busy, frames, copied = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                driver.execute("PRAGMA busy_timeout=30000")
        return WalCheckpoint(busy=bool(busy), frames=int(frames), copied=int(copied))


@dataclass(frozen=True, slots=True)
class WalCheckpoint:
    """What `Database.checkpoint_wal` did, as SQLite's `wal_checkpoint` says it: `busy` if
    readers or a writer kept it from finishing; the log's frames and those copied (0 and 0
    once truncated, -1 when it could not start)."""

    busy: bool
    frames: int
    copied: int


def get_db(request: Request) -> Database:
    """The operational store of the running app."""
    db: Database = request.app.state.db
    return db


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: commits on success, rolls back on error."""
    with get_db(request).begin() as session:
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is a 500.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def all_rows(session: Session, query: Select[*tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    # Any: the columns of any select
    """Every row of `query` as tuples, typed as `session.execute(query).all()` would give them.

    On SQLite the rows come back packed in one JSON array, fetched in one step: Python's
    sqlite3 releases the GIL around every row it steps, and in the busy server each row then
    waits for the request thread holding the GIL to reach its switch interval (the convoy
    effect: a read of 5,000 member rows took a second under ingestion load, 0.05 s at rest).
    Each column goes through its type's result processing (timestamps, booleans); floats
    travel as 17-digit text, since SQLite's JSON writes 15 digits. Rows keep the query's
    order: SQLite does not flatten an ordered subquery into an aggregate. Other databases
    fetch as usual.
    """
    dialect = session.get_bind().dialect
    if dialect.name != "sqlite":
        return [tuple(row) for row in session.execute(query).all()]
    inner = query.subquery()
    columns = list(inner.c)
    floats = [isinstance(c.type, Float) for c in columns]
    packed = [
        case((c.is_(None), None), else_=func.printf("%!.17g", c)) if is_float else c
        for c, is_float in zip(columns, floats, strict=True)
    ]
    text_ = session.execute(
        select(func.json_group_array(func.json_array(*packed))).select_from(inner)
    ).scalar_one()
    processors = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
    rows = []
    for values in json.loads(text_):
        row = []
        for value, is_float, process in zip(values, floats, processors, strict=True):
            if is_float and value is not None:
                value = float(value)
            row.append(process(value) if process is not None else value)
        rows.append(tuple(row))
    return rows


# Rows a large read holds as Python objects at once (`frame_of`).
FRAME_PARTITION = 50_000


def frame_of(
    session: Session,
    query: Select[*tuple[Any, ...]],
    schema: dict[str, pl.DataType],
    *,
    partition: int = FRAME_PARTITION,
) -> pl.DataFrame:
    """A select's rows as a Polars frame (columns named and typed by `schema`, in order),
    read and converted `partition` rows at a time.

    For the reads of a whole table in a server process: holding a million rows as Python
    objects made the collector run full collections over a growing heap (up to 0.36 s each,
    1.9 s in all for the 1M-member snapshot), pauses that stop every thread, and the
    one-piece conversion held the GIL for up to a second; the real-time job fell seconds
    behind each time. Partitions keep the heap flat and hand the GIL over between them.
    """
    result = session.execute(query.execution_options(yield_per=partition))
    frames = [pl.DataFrame(rows, schema=schema, orient="row") for rows in result.partitions()]
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)
