"""SQLite bulk inserts: multi-row statements rather than one driver step per row."""

from __future__ import annotations

from datetime import UTC, timedelta

import polars as pl
from sqlalchemy import select

from cdp.db import Database
from loyalty import ledger
from loyalty.models import Member
from tests.loyalty.conftest import T0, make_program


def _members(program_id: str, count: int) -> pl.DataFrame:
    """Membership rows m0, m1, ... of profiles p0, p1, ..., enrolled a second apart."""
    return pl.DataFrame(
        {
            "id": [f"m{i}" for i in range(count)],
            "program_id": program_id,
            "profile_id": [f"p{i}" for i in range(count)],
            "status": "active",
            "enrolled_at": [T0 + timedelta(seconds=i) for i in range(count)],
            "status_changed_at": T0,
            "lock_seq": 0,
        }
    )


def test_bulk_insert_on_sqlite_runs_one_statement_per_chunk_of_rows(db: Database) -> None:
    """SQLite bulk inserts go as multi-row statements, not one driver step per row: every
    step hands the GIL over, and in the busy server each handover waits for another
    thread's switch interval (5,000 ledger rows took seconds under ingestion load)."""
    program = make_program(db)
    count = 2 * ledger.SQLITE_ROWS_PER_INSERT + 7
    rows = _members(program.id, count)
    inserts: list[str] = []
    with db.begin() as session:
        driver = session.connection().connection.dbapi_connection
        assert driver is not None
        driver.set_trace_callback(
            lambda sql: inserts.append(sql) if sql.lstrip().upper().startswith("INSERT") else None
        )
        try:
            # A third of them already there: skipped and not counted.
            assert ledger.bulk_insert(session, Member.__table__, rows.head(count // 3)) == (
                count // 3
            )
            inserts.clear()
            assert ledger.bulk_insert(session, Member.__table__, rows) == count - count // 3
        finally:
            driver.set_trace_callback(None)
    assert len(inserts) == 3  # 500 + 500 + 7 rows, against 1,007 executions row by row
    with db.begin() as session:
        stored = session.execute(
            select(Member.id, Member.profile_id, Member.enrolled_at).where(
                Member.program_id == program.id
            )
        ).all()
    assert sorted((m, p, at.astimezone(UTC)) for m, p, at in stored) == sorted(
        (f"m{i}", f"p{i}", T0 + timedelta(seconds=i)) for i in range(count)
    )


def test_a_bulk_insert_larger_than_the_multi_row_limit_counts_the_same(db: Database) -> None:
    """Above `SQLITE_MULTI_ROW_MAX` rows (a backfill's batches) the rows go through the
    driver's `executemany`: the same rows kept, existing keys skipped and not counted."""
    program = make_program(db)
    count = ledger.SQLITE_MULTI_ROW_MAX + 11
    rows = _members(program.id, count)
    with db.begin() as session:
        assert ledger.bulk_insert(session, Member.__table__, rows.head(100)) == 100
        assert ledger.bulk_insert(session, Member.__table__, rows) == count - 100
    with db.begin() as session:
        stored = session.execute(
            select(Member.id, Member.enrolled_at).where(Member.program_id == program.id)
        ).all()
    assert sorted((m, at.astimezone(UTC)) for m, at in stored) == sorted(
        (f"m{i}", T0 + timedelta(seconds=i)) for i in range(count)
    )
