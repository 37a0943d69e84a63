"""The ledger: lots, FIFO spending, pending and expiry, balances, idempotent writes."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from cdp.config import Settings
from cdp.db import Database, utcnow
from cdp.warehouse import Warehouse
from loyalty import ledger, service
from loyalty.errors import InsufficientPoints
from loyalty.models import LedgerEntry, Lot, LotDraw, Member, Program
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, earn, make_member, make_program, run_job

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def test_spend_takes_the_soonest_expiring_lots_first_and_records_its_draws(db: Database) -> None:
    program = make_program(db, expiry_policy="rolling", expiry_months=12)
    member = make_member(db, program)
    late = earn(db, program, member, 100, at=T0 + timedelta(days=60))
    early = earn(db, program, member, 50, at=T0)
    never = earn(db, program, member, 30, at=T0 + timedelta(days=1), key="never")
    now = T0 + timedelta(days=90)
    with db.begin() as session:
        ledger.lock_member(session, member_id=member.id)
        spend = ledger.debit(
            session,
            program=program,
            member_id=member.id,
            kind="redeem",
            points=120,
            idempotency_key="spend-1",
            now=now,
        )
    with db.begin() as session:
        draws = {
            d.lot_id: d.points
            for d in session.scalars(select(LotDraw).where(LotDraw.entry_id == spend.id))
        }
        remaining = {lot.entry_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert spend.points == -120
        assert draws == {early.id: 50, never.id: 30, late.id: 40}
        assert remaining == {early.id: 0, never.id: 0, late.id: 60}
        assert ledger.entries_sum(session, member_id=member.id) == 60
        assert ledger.lots_sum(session, member_id=member.id) == 60


def test_debit_beyond_the_active_balance_fails_and_writes_nothing(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program)
    earn(db, program, member, 40)
    with db.begin() as session:
        ledger.lock_member(session, member_id=member.id)
        with pytest.raises(InsufficientPoints) as caught:
            ledger.debit(
                session,
                program=program,
                member_id=member.id,
                kind="redeem",
                points=41,
                idempotency_key="too-much",
                now=T0,
            )
    assert caught.value.details == {"needed": 41, "available": 40}
    with db.begin() as session:
        assert ledger.find_entry(session, key="too-much") is None
        assert ledger.lots_sum(session, member_id=member.id) == 40


def test_pending_points_are_held_until_the_pending_period_ends(db: Database) -> None:
    program = make_program(db, pending_days=14)
    member = make_member(db, program)
    earn(db, program, member, 200, at=T0)
    with db.begin() as session:
        held = ledger.balance(session, program=program, member_id=member.id, now=T0)
        assert (held.active, held.pending, held.total) == (0, 200, 200)
        assert held.next_pending_release == datetime(2026, 3, 16, tzinfo=UTC)
        ledger.lock_member(session, member_id=member.id)
        with pytest.raises(InsufficientPoints):
            ledger.debit(
                session,
                program=program,
                member_id=member.id,
                kind="redeem",
                points=1,
                idempotency_key="early",
                now=T0 + timedelta(days=13),
            )
        released = ledger.balance(
            session, program=program, member_id=member.id, now=datetime(2026, 3, 16, tzinfo=UTC)
        )
        assert (released.active, released.pending) == (200, 0)


def test_writing_the_same_idempotency_key_twice_awards_once(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program)
    first = earn(db, program, member, 10, key="event:m1:rule:r1")
    again = earn(db, program, member, 10, key="event:m1:rule:r1")
    assert first.id == again.id
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 10
        assert len(session.scalars(select(LedgerEntry)).all()) == 1


def test_expiry_job_expires_exactly_what_is_left_of_past_lots(db: Database) -> None:
    program = make_program(db, expiry_policy="rolling", expiry_months=1)
    member = make_member(db, program)
    old = earn(db, program, member, 100, at=T0)
    earn(db, program, member, 70, at=T0 + timedelta(days=40))
    with db.begin() as session:
        ledger.lock_member(session, member_id=member.id)
        ledger.debit(
            session,
            program=program,
            member_id=member.id,
            kind="redeem",
            points=30,
            idempotency_key="r",
            now=T0 + timedelta(days=1),
        )
    after = datetime(2026, 4, 3, tzinfo=UTC)  # lot earned 2 March is valid through 2 April
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        assert ledger.expire_due(session, program=stored, now=after) == 1
        assert ledger.expire_due(session, program=stored, now=after) == 0
    with db.begin() as session:
        expired = session.scalars(select(LedgerEntry).where(LedgerEntry.kind == "expire")).all()
        assert [(e.points, e.occurred_at) for e in expired] == [
            (-70, datetime(2026, 4, 3, tzinfo=UTC))
        ]
        lot = session.get(Lot, old.id)
        assert lot is not None
        assert lot.remaining == 0
        view = ledger.balance(session, program=program, member_id=member.id, now=after)
        assert (view.active, view.total) == (70, 70)


def test_expiring_soon_lists_points_by_local_expiry_date(db: Database) -> None:
    program = make_program(db, expiry_policy="end_of_period", expiry_months=12)
    member = make_member(db, program)
    earn(db, program, member, 25, at=datetime(2026, 6, 1, tzinfo=UTC))
    earn(db, program, member, 5, at=datetime(2027, 1, 2, tzinfo=UTC))
    with db.begin() as session:
        view = ledger.balance(
            session, program=program, member_id=member.id, now=datetime(2026, 12, 10, tzinfo=UTC)
        )
    assert [(e.date.isoformat(), e.points) for e in view.expiring_soon] == [("2026-12-31", 25)]


def test_merge_moves_lots_to_the_survivor_and_replaying_it_changes_nothing(db: Database) -> None:
    program = make_program(db)
    absorbed = make_member(db, program, "old")
    survivor = make_member(db, program, "new")
    earn(db, program, absorbed, 40, key="a")
    earn(db, program, survivor, 60, key="b")
    for _ in range(2):
        with db.begin() as session:
            service.merge_profiles(
                session, program_id=program.id, from_profile_id="old", to_profile_id="new"
            )
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=survivor.id) == 100
        assert ledger.entries_sum(session, member_id=survivor.id) == 100
        assert ledger.entries_sum(session, member_id=absorbed.id) == 0
        assert service.qualifying_points(session, member_id=survivor.id) == 100
        gone = service.get_member(session, member_id=absorbed.id)
        assert (gone.status, gone.merged_into) == ("merged", survivor.id)
    with db.begin() as session:
        # Identity's direction: "new" lost the identifiers that form "old" again.
        service.split_profiles(
            session, program_id=program.id, from_profile_id="new", to_profile_id="old"
        )
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=absorbed.id) == 40
        assert ledger.entries_sum(session, member_id=absorbed.id) == 40
        assert ledger.lots_sum(session, member_id=survivor.id) == 60
        assert service.get_member(session, member_id=absorbed.id).status == "active"


def test_merge_into_a_profile_without_membership_rekeys_the_membership(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program, "old")
    with db.begin() as session:
        service.merge_profiles(
            session, program_id=program.id, from_profile_id="old", to_profile_id="new"
        )
        found = service.member_by_profile(session, program_id=program.id, profile_id="new")
    assert found.id == member.id


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planned_reversals_draw_exactly_what_debit_draws(db: Database, seed: int) -> None:
    """`plan_reversal` (the bulk path of refunds) == `debit(order_id=, include_pending=True,
    partial=True, as_of=)` step by step: own lots first, then lots alive at the refund."""
    rng = random.Random(seed)
    program = make_program(db, expiry_policy="rolling", expiry_months=1, pending_days=3)
    member = make_member(db, program)
    for i in range(12):
        at = T0 + timedelta(days=rng.choice([0, 0, 5, 20, 40, 70]))
        earn(
            db,
            program,
            member,
            rng.randint(1, 60),
            at=at,
            key=f"lot-{i}",
            order_id=rng.choice(["o1", "o2", None]),
        )
    for step in range(10):
        as_of = T0 + timedelta(days=rng.randint(0, 80))
        order = rng.choice(["o1", "o2", "o3"])
        points = rng.randint(0, 90)
        with db.begin() as session:
            lots = ledger.lots_of_members(session, member_ids=[member.id])[member.id]
            plan, left = ledger.plan_reversal(lots, points=points, order_id=order, as_of=as_of)
            ledger.lock_member(session, member_id=member.id)
            entry = ledger.debit(
                session,
                program=session.get(Program, program.id) or program,
                member_id=member.id,
                kind="reverse",
                points=points,
                idempotency_key=f"reverse-{step}",
                order_id=order,
                include_pending=True,
                partial=True,
                as_of=as_of,
                occurred_at=as_of,
                now=as_of,
            )
            draws = session.execute(
                select(LotDraw.lot_id, LotDraw.points)
                .where(LotDraw.entry_id == entry.id)
                .order_by(LotDraw.id)
            ).all()
            assert [tuple(d) for d in draws] == plan
            assert entry.unrecovered == left
            after = {lot.entry_id: lot.remaining for lot in session.scalars(select(Lot))}
            assert {lot.entry_id: lot.remaining for lot in lots} == {
                lot.entry_id: after[lot.entry_id] for lot in lots
            }


def test_ordered_ids_sort_by_instant_and_are_the_same_for_the_same_key(backend: str) -> None:
    keys = ["event:m1:rule:r1", "import:p:q", "é:ü", "", *(f"k{i}" for i in range(100))]
    millis = [1_700_000_000_000 + 1000 * (i % 7) for i in range(len(keys))]
    ids = ledger.ordered_ids(keys, millis)
    assert ids == ledger.ordered_ids(keys, millis)
    assert len(set(ids)) == len(keys)
    assert all(uuid.UUID(i).version == 8 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert [int(i.replace("-", "")[:12], 16) for i in ids] == millis
    by_id = sorted(range(len(keys)), key=lambda i: ids[i])
    assert [millis[i] for i in by_id] == sorted(millis)
    # The same key at another instant is another id; before 1970 the instant is 0.
    assert ledger.ordered_ids(["k1"], [1]) != ledger.ordered_ids(["k1"], [2])
    assert ledger.ordered_ids(["k1"], [-5]) == ledger.ordered_ids(["k1"], [0])


def test_a_batch_with_a_key_written_under_another_id_gets_lots_for_its_new_entries_only(
    db: Database,
) -> None:
    """A key may be in the ledger under an id that is not the one a batch computes (entries
    written before ids were ordered by time, or the same key at another instant): the batch
    writes its other entries with their lots and leaves that one, with no lot of its own."""
    program = make_program(db)
    member = make_member(db, program)
    old = earn(db, program, member, 10, at=T0 + timedelta(days=1), key="event:m1:rule:r")
    with db.begin() as session:
        frame = pl.DataFrame(
            {
                "member_id": [member.id, member.id],
                "kind": ["earn", "earn"],
                "points": [10, 7],
                "qualifying_points": [10, 7],
                "occurred_at": [T0, T0 + timedelta(hours=1)],
                "idempotency_key": ["event:m1:rule:r", "event:m2:rule:r"],
            },
            schema_overrides={"occurred_at": pl.Datetime("us", "UTC")},
        )
        assert ledger.write_credits(session, program=program, frame=frame, now=T0) == 1
    with db.begin() as session:
        entries = {e.idempotency_key: e.id for e in session.scalars(select(LedgerEntry))}
        lots = {lot.entry_id: lot.points for lot in session.scalars(select(Lot))}
        assert entries["event:m1:rule:r"] == old.id
        assert len(entries) == 2
        assert lots == {old.id: 10, entries["event:m2:rule:r"]: 7}


def test_bulk_insert_leaves_the_connection_settings_as_it_found_them(db: Database) -> None:
    """SQLite's bulk insert raises the page cache for itself only, or keeps the cache of the
    block that raised it: the pooled connection gets its own setting back."""
    program = make_program(db)
    with db.begin() as session:
        connection = session.connection()
        sqlite = connection.dialect.name == "sqlite"
        before = connection.exec_driver_sql("PRAGMA cache_size").scalar_one() if sqlite else None
        rows = pl.DataFrame(
            {
                "id": ["m-cache"],
                "program_id": [program.id],
                "profile_id": ["p-cache"],
                "status": ["active"],
                "enrolled_at": [T0],
                "status_changed_at": [T0],
                "lock_seq": [0],
            }
        )
        assert ledger.bulk_insert(session, Member.__table__, rows) == 1
        if sqlite:
            assert connection.exec_driver_sql("PRAGMA cache_size").scalar_one() == before
        assert session.get(Member, "m-cache") is not None
        # Inside a block that raised it (a backfill), the cache stays raised between inserts
        # and is given back at the block's end.
        with ledger.large_cache(session):
            second = rows.with_columns(
                pl.lit("m-cache-2").alias("id"), pl.lit("p2").alias("profile_id")
            )
            assert ledger.bulk_insert(session, Member.__table__, second) == 1
            if sqlite:
                raised = connection.exec_driver_sql("PRAGMA cache_size").scalar_one()
                assert raised == -ledger.LARGE_CACHE_KIB != before
        if sqlite:
            assert connection.exec_driver_sql("PRAGMA cache_size").scalar_one() == before


def test_bulk_insert_of_many_rows_skips_existing_keys_and_counts_the_new(db: Database) -> None:
    """Large batches take PostgreSQL's COPY path (a staging table, then INSERT ... SELECT
    ... ON CONFLICT DO NOTHING): the same rows and counts as the small-batch path."""
    program = make_program(db)
    count = ledger.COPY_MIN_ROWS + 200

    def rows(start: int, stop: int) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "id": [f"m{i}" for i in range(start, stop)],
                "program_id": program.id,
                "profile_id": [f"p{i}" for i in range(start, stop)],
                "status": "active",
                "enrolled_at": [T0 + timedelta(seconds=i) for i in range(start, stop)],
                "status_changed_at": T0,
                "lock_seq": 0,
            }
        )

    with db.begin() as session:
        assert ledger.bulk_insert(session, Member.__table__, rows(0, count)) == count
        # Twice in one transaction (the staging table is reused), half of it already there.
        again = rows(count // 2, count + count // 2)
        assert ledger.bulk_insert(session, Member.__table__, again) == count - count // 2
    with db.begin() as session:
        stored = session.execute(
            select(Member.id, Member.profile_id, Member.enrolled_at).where(
                Member.program_id == program.id
            )
        ).all()
    assert len(stored) == count + count // 2
    assert {(m, p, at.astimezone(UTC)) for m, p, at in stored} == {
        (f"m{i}", f"p{i}", T0 + timedelta(seconds=i)) for i in range(count + count // 2)
    }


def test_expiry_job_commits_chunk_by_chunk(
    settings: Settings, db: Database, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk of due lots is committed before the next one starts, so the write lock is
    free between them (real time commits in between); every due lot is expired once."""
    monkeypatch.setattr(ledger, "EXPIRY_CHUNK", 2)
    program = make_program(db, expiry_policy="rolling", expiry_months=1)
    for n in range(5):
        earn(db, program, make_member(db, program, profile_id=f"p{n}"), 10 + n, at=T0)
    other = Database(db.engine.url)  # another connection sees only what is committed
    committed_at_each_chunk: list[int] = []
    expire_lots = service.expire_lots

    def observed(session: Session, **kwargs: Any) -> int:  # Any: the call's arguments
        with other.begin() as reader:
            committed_at_each_chunk.append(
                len(reader.scalars(select(LedgerEntry).where(LedgerEntry.kind == "expire")).all())
            )
        return expire_lots(session, **kwargs)

    monkeypatch.setattr(service, "expire_lots", observed)
    try:
        run = run_job(settings, db, warehouse, "loyalty.expire_points")
    finally:
        other.dispose()
    assert (run.status, run.rows) == ("succeeded", 5)
    assert committed_at_each_chunk == [0, 2, 4]
    with db.begin() as session:
        assert ledger.expire_due(session, program=program, now=utcnow()) == 0
