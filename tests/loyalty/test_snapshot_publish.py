"""The member snapshot (segment fields `loyalty.*`): real time replaces only the rows it touched.

At 1M members the whole rewrite takes seconds; the real-time job used to do it every 30 s
inline and stalled. It now republishes the memberships of the events it processed and of the
profiles it merged or erased, and never waits for the scheduled full rewrite.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobContext, JobRun, JobRunner
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from loyalty import jobs, service
from loyalty.models import Program
from tests.loyalty.conftest import add_base_rule, make_program
from tests.loyalty.identity_data import profile_of, resolve, write_events

EARLIER = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def runner(
    settings: Settings, db: Database, warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch
) -> Iterator[JobRunner]:
    # Every run publishes what it touched (30 s apart at most in service).
    monkeypatch.setattr(jobs, "SNAPSHOT_EVERY", 0.0)
    job_runner = JobRunner(settings, db, warehouse)
    job_runner.register(*jobs.JOBS)
    yield job_runner
    job_runner.shutdown()


def _earning_program(db: Database) -> Program:
    """An automatic-enrolment programme earning 1 point per unit spent."""
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
    return program


def _real_time(runner: JobRunner) -> JobRun:
    run = runner.run("loyalty.process_events", trigger="manual")
    assert run.status == "succeeded", run.message
    return run


def _published(warehouse: Warehouse) -> dict[str, tuple[int, bool, datetime]]:
    """profile id -> (balance, enrolled, refreshed_at) of each published row."""
    rows = warehouse.rows(
        Query("SELECT profile_id, balance, enrolled, refreshed_at FROM loyalty_member_snapshot")
    )
    published = {str(p): (int(b), bool(e), r) for p, b, e, r in rows}
    assert len(published) == len(rows), "one row per profile in a single programme"
    return published


def test_real_time_republishes_the_members_it_touched_and_leaves_the_others(
    db: Database, warehouse: Warehouse, runner: JobRunner
) -> None:
    _earning_program(db)
    write_events(
        warehouse,
        [
            ([("email", "ann@example.com")], "Order Completed", 30),
            ([("email", "bob@example.com")], "Order Completed", 50),
        ],
    )
    _real_time(runner)
    ann, bob = (profile_of(warehouse, "email", f"{n}@example.com") for n in ("ann", "bob"))
    assert {p: v[:2] for p, v in _published(warehouse).items()} == {
        ann: (30, True),
        bob: (50, True),
    }
    # A full publish at an earlier instant marks every row with it.
    with db.begin() as session:
        assert service.publish_member_snapshot(session, warehouse, now=EARLIER) == 2

    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 12)])
    _real_time(runner)
    published = _published(warehouse)
    assert published[ann][0] == 42
    assert published[ann][2] > EARLIER.replace(tzinfo=None)
    assert published[bob] == (50, True, EARLIER.replace(tzinfo=None)), "bob was not touched"


def test_a_merge_replaces_the_two_rows_by_the_survivor_and_an_erasure_removes_its_row(
    db: Database, warehouse: Warehouse, runner: JobRunner
) -> None:
    _earning_program(db)
    write_events(
        warehouse,
        [
            ([("email", "ann@example.com")], "Order Completed", 30),
            ([("phone", "+33600000001")], "Order Completed", 20),
            ([("email", "cid@example.com")], "Order Completed", 5),
        ],
    )
    _real_time(runner)
    ann, phone, cid = (
        profile_of(warehouse, "email", "ann@example.com"),
        profile_of(warehouse, "phone", "+33600000001"),
        profile_of(warehouse, "email", "cid@example.com"),
    )
    assert set(_published(warehouse)) == {ann, phone, cid}

    # An event carrying both identifiers merges the two profiles (the older id survives);
    # it is not an order, so only the merge touches the memberships.
    write_events(
        warehouse, [([("email", "ann@example.com"), ("phone", "+33600000001")], "Signed In", 0)]
    )
    _real_time(runner)
    survivor = profile_of(warehouse, "email", "ann@example.com")
    assert survivor == ann
    published = _published(warehouse)
    assert set(published) == {ann, cid}
    assert published[ann][:2] == (50, True)

    with db.begin() as session:
        identity_service.erase_profile(session, warehouse, profile_id=cid, actor="test")
    _real_time(runner)
    assert set(_published(warehouse)) == {ann}


def test_while_a_full_publish_runs_real_time_keeps_its_rows_for_the_next_run(
    db: Database, warehouse: Warehouse, runner: JobRunner
) -> None:
    program = _earning_program(db)
    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 30)])
    resolve(warehouse)
    ann = profile_of(warehouse, "email", "ann@example.com")
    # Held as the scheduled full publish holds it while it reads and writes.
    with service._SNAPSHOT_LOCK:
        run = _real_time(runner)
    assert run.rows == 1, "the points were awarded without waiting for the snapshot"
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id=ann)
        assert service.balance_read(session, member_id=member.id).active == 30
    assert _published(warehouse) == {}

    _real_time(runner)  # nothing new to process: the rows kept are published
    assert {p: v[:2] for p, v in _published(warehouse).items()} == {ann: (30, True)}


def test_a_long_real_time_run_publishes_between_its_passes(
    db: Database, warehouse: Warehouse, runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that keeps taking new events publishes the rows it touched as it goes (at most
    every `SNAPSHOT_EVERY`, 0 here), not only when it ends."""
    _earning_program(db)
    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 10)])
    at_pass_start: list[dict[str, tuple[int, bool, datetime]]] = []  # what was published
    one_pass = jobs._one_pass

    def observed(context: JobContext) -> jobs._Pass:
        at_pass_start.append(_published(warehouse))
        passed = one_pass(context)
        if len(at_pass_start) == 1:  # another order arrives during the first pass
            write_events(warehouse, [([("email", "bob@example.com")], "Order Completed", 7)])
        return passed

    monkeypatch.setattr(jobs, "_one_pass", observed)
    _real_time(runner)
    ann = profile_of(warehouse, "email", "ann@example.com")
    bob = profile_of(warehouse, "email", "bob@example.com")
    assert ann not in at_pass_start[0]
    assert at_pass_start[1][ann][:2] == (10, True)  # published before the run ended
    assert _published(warehouse)[bob][:2] == (7, True)


def _refreshed(warehouse: Warehouse) -> dict[str, datetime]:
    rows = warehouse.rows(
        Query("SELECT member_id, refreshed_at FROM loyalty_member_snapshot ORDER BY member_id")
    )
    return {str(m): r for m, r in rows}


def test_the_scheduled_job_republishes_the_snapshot_a_slice_at_a_time(
    db: Database, warehouse: Warehouse, runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run rewrites the next slice of memberships by id and wraps around after the
    last; the last slice's open range also drops rows no membership holds any more."""
    monkeypatch.setattr(jobs, "SNAPSHOT_SLICES", 2)
    monkeypatch.setattr(jobs, "SNAPSHOT_MIN_SLICE", 2)
    _earning_program(db)
    names = ("ann", "bob", "cid", "dan", "eve")
    write_events(
        warehouse, [([("email", f"{n}@example.com")], "Order Completed", 10) for n in names]
    )
    _real_time(runner)
    with db.begin() as session:
        assert service.publish_member_snapshot(session, warehouse, now=EARLIER) == 5
    members = sorted(_refreshed(warehouse))
    # A row of a membership that no longer exists, after every id: only a slice drops it.
    warehouse.execute(
        Query(
            "INSERT INTO loyalty_member_snapshot SELECT * REPLACE ('zzzz' AS member_id,"
            " 'ghost' AS profile_id) FROM loyalty_member_snapshot LIMIT 1"
        )
    )
    old = EARLIER.replace(tzinfo=None)

    first = runner.run("loyalty.publish_snapshot", trigger="manual")
    assert (first.status, first.rows) == ("succeeded", 3)  # ceil(5 / 2)
    refreshed = _refreshed(warehouse)
    assert [m for m in members if refreshed[m] > old] == members[:3]
    assert "zzzz" in refreshed

    last = runner.run("loyalty.publish_snapshot", trigger="manual")
    assert (last.rows, last.message) == (2, "2 memberships published (last slice)")
    refreshed = _refreshed(warehouse)
    assert sorted(refreshed) == members
    assert all(refreshed[m] > old for m in members)

    again = runner.run("loyalty.publish_snapshot", trigger="manual")
    assert again.rows == 3
    assert max(_refreshed(warehouse).items(), key=lambda kv: kv[1])[0] in members[:3]
