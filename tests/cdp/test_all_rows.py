"""`cdp.db.all_rows`: the rows of a select fetched in one step on SQLite, typed as usual;
`cdp.db.frame_of`: a large read converted to a frame a partition at a time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from sqlalchemy import BigInteger, Boolean, Float, Integer, String, func, literal, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cdp.db import Database, UtcDateTime, all_rows, frame_of
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


class _Base(DeclarativeBase):
    """Apart from the platform's tables (the migration tests compare those)."""


class _Sample(_Base):
    __tablename__ = "test_all_rows_sample"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(50))
    at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ratio: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool | None] = mapped_column(Boolean)
    big: Mapped[int | None] = mapped_column(BigInteger)


T = datetime(2026, 3, 29, 0, 59, 59, 123456, tzinfo=UTC)


def _samples() -> list[_Sample]:
    return [
        _Sample(id=1, name="plain", at=T, ratio=0.1 + 0.2, active=True, big=2**40 + 1),
        _Sample(
            id=2, name='quote " and é ✓', at=T + timedelta(days=400), ratio=1e-300, active=False
        ),
        _Sample(id=3, name=None, at=None, ratio=None, active=None, big=None),
        _Sample(id=4, name="z", at=T, ratio=123456789.123456789, active=True, big=-7),
    ]


@pytest.fixture
def sample_db(db: Database) -> Database:
    _Base.metadata.create_all(db.engine)
    return db


def test_all_rows_gives_what_execute_gives(sample_db: Database) -> None:
    db = sample_db
    with db.begin() as session:
        session.add_all(_samples())
    queries = [
        select(
            _Sample.id, _Sample.name, _Sample.at, _Sample.ratio, _Sample.active, _Sample.big
        ).order_by(_Sample.id.desc()),
        # Expanding IN parameters, expressions and labels, an aggregate.
        select(_Sample.name, func.coalesce(_Sample.big, 0), literal("x").label("tag"))
        .where(_Sample.id.in_([1, 2, 3]))
        .order_by(_Sample.id),
        select(func.sum(_Sample.ratio), func.count(), func.max(_Sample.at)),
        select(_Sample.id).where(_Sample.id > 99),
    ]
    with db.begin() as session:
        for query in queries:
            assert all_rows(session, query) == [tuple(r) for r in session.execute(query).all()]
        rows = all_rows(session, queries[0])
        assert all_rows(session, queries[3]) == []
    assert [r[0] for r in rows] == [4, 3, 2, 1]  # the query's order
    assert rows[3][3] == 0.1 + 0.2  # every digit
    assert rows[0][3] == 123456789.123456789
    assert rows[3][2] == T
    assert rows[3][2].tzinfo is not None
    assert rows[3][4] is True
    assert rows[2][4] is False


def test_all_rows_reads_sqlite_in_one_statement_of_one_row(sample_db: Database) -> None:
    """The point of it: one driver step for the whole result on SQLite, however many rows
    (Python's sqlite3 hands the GIL over at each row it steps)."""
    db = sample_db
    with db.begin() as session:
        session.add_all(_Sample(id=i, name=f"n{i}") for i in range(1, 1001))
    with db.begin() as session:
        connection = session.connection()
        if connection.dialect.name != "sqlite":
            assert len(all_rows(session, select(_Sample.id))) == 1000
            return
        driver = connection.connection.dbapi_connection
        assert driver is not None
        statements: list[str] = []
        driver.set_trace_callback(statements.append)
        try:
            rows = all_rows(session, select(_Sample.id, _Sample.name).order_by(_Sample.id))
        finally:
            driver.set_trace_callback(None)
    assert rows == [(i, f"n{i}") for i in range(1, 1001)]
    assert len(statements) == 1
    assert "json_group_array" in statements[0]


def test_frame_of_reads_in_partitions_what_execute_gives(sample_db: Database) -> None:
    """`cdp.db.frame_of`: the same rows, in the query's order and typed by the schema,
    whatever the partition size; an empty result is an empty frame of that schema."""
    db = sample_db
    with db.begin() as session:
        session.add_all(_samples())
    schema: dict[str, pl.DataType] = {
        "id": pl.Int64(),
        "name": pl.String(),
        "at": pl.Datetime("us", "UTC"),
        "ratio": pl.Float64(),
        "active": pl.Boolean(),
    }
    query = select(_Sample.id, _Sample.name, _Sample.at, _Sample.ratio, _Sample.active).order_by(
        _Sample.id.desc()
    )
    with db.begin() as session:
        whole = pl.DataFrame(session.execute(query).all(), schema=schema, orient="row")
        for partition in (1, 3, 1000):
            frame = frame_of(session, query, schema, partition=partition)
            assert frame.equals(whole, null_equal=True), partition
        empty = frame_of(session, query.where(_Sample.id > 99), schema, partition=2)
    assert whole["id"].to_list() == [4, 3, 2, 1]
    assert whole["at"][3] == T
    assert empty.is_empty()
    assert empty.schema == pl.Schema(schema)
