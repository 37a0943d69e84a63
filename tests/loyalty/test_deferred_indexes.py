"""A large backfill builds its secondary indexes after its writes, atomically (SQLite)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, inspect, select

from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import ledger, service
from loyalty.models import Activity, LedgerEntry, Lot, Program
from loyalty.schemas import TierCreate
from tests.loyalty.conftest import T0, add_base_rule, make_program
from tests.loyalty.events import ev
from tests.loyalty.test_backfill import _load_warehouse

TABLES = ("loyalty_ledger_entry", "loyalty_lot", "loyalty_activity")
OCCURRED = "ix_loyalty_ledger_entry_occurred"


def _index_names(db: Database) -> set[str]:
    found = inspect(db.engine)
    return {str(i["name"]) for table in TABLES for i in found.get_indexes(table)}


def _model_index_names() -> set[str]:
    tables = (LedgerEntry.__table__, Lot.__table__, Activity.__table__)
    return {str(i.name) for t in tables for i in t.indexes}  # type: ignore[attr-defined]


def test_model_indexes_are_the_ones_created(db: Database) -> None:
    assert _index_names(db) == _model_index_names()
    assert set(ledger.DEFERRABLE_INDEXES) | set(ledger.MEMBER_INDEXES) <= _model_index_names()


def test_deferred_indexes_are_dropped_only_inside_the_writing_transaction(db: Database) -> None:
    other = Database(db.engine.url)
    try:
        with db.begin() as session:
            names = [*ledger.DEFERRABLE_INDEXES, *ledger.MEMBER_INDEXES]
            with ledger.deferred_indexes(session, names=names) as dropped:
                assert dropped == names
                mine = session.connection().exec_driver_sql(
                    "SELECT name FROM sqlite_master WHERE type = 'index'"
                )
                assert not set(names) & {row[0] for row in mine}
                # Another connection still reads the committed schema, indexes included.
                assert set(names) <= _index_names(other)
        assert _index_names(db) == _model_index_names()
        # A failure rolls the drop back with the rest of the unit of work.
        with (
            pytest.raises(RuntimeError, match="boom"),
            db.begin() as session,
            ledger.deferred_indexes(session, names=names),
        ):
            raise RuntimeError("boom")
        assert _index_names(db) == _model_index_names()
    finally:
        other.dispose()


def _programme(db: Database, *, with_tiers: bool) -> Program:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
        if with_tiers:
            service.create_tier(
                session,
                program_id=program.id,
                data=TierCreate(name="Gold", rank=1, threshold=1000, multiplier=2),
            )
    return program


def test_only_a_backfill_larger_than_the_ledger_defers_and_tiers_keep_member_indexes(
    db: Database,
) -> None:
    bare = _programme(db, with_tiers=False)
    tiered = _programme(db, with_tiers=True)
    with db.begin() as session:
        assert service._deferrable(session, bare, events=10) == [
            *ledger.DEFERRABLE_INDEXES,
            *ledger.MEMBER_INDEXES,
        ]
        assert service._deferrable(session, tiered, events=10) == list(ledger.DEFERRABLE_INDEXES)
        assert service._deferrable(session, bare, events=0) == []


def test_backfill_into_an_empty_ledger_leaves_every_index_in_place(
    db: Database, warehouse: Warehouse
) -> None:
    program = _programme(db, with_tiers=False)
    rows = [ev(f"c{i % 7}", T0, event_id=i + 1, total=10 + i, order_id=f"o{i}") for i in range(40)]
    _load_warehouse(warehouse, rows)
    with db.begin() as session:
        assert service._deferrable(session, program, events=len(rows))
        result, _ = service.backfill(session, warehouse, program_id=program.id)
    assert result.credits == 40
    assert _index_names(db) == _model_index_names()
    with db.begin() as session:
        # The rebuilt indexes answer: the dashboards' index by time covers every entry.
        plan = session.connection().exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT count(*) FROM loyalty_ledger_entry"
            f" INDEXED BY {OCCURRED} WHERE occurred_at >= ?",
            ("2000-01-01",),
        )
        assert OCCURRED in " ".join(str(row[-1]) for row in plan)
        assert session.scalar(select(func.count()).select_from(LedgerEntry)) == 40


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_nothing_is_deferred_on_postgresql(db: Database) -> None:
    """A dropped index would lock PostgreSQL's readers of the table out until the commit."""
    program = _programme(db, with_tiers=False)
    with db.begin() as session:
        assert service._deferrable(session, program, events=10) == []
        with ledger.deferred_indexes(session, names=list(ledger.DEFERRABLE_INDEXES)) as dropped:
            assert dropped == []
    # PostgreSQL also lists the unique constraints' indexes.
    assert _model_index_names() <= _index_names(db)
