"""Loyalty keyed by identity: events earn for resolved profiles, merges fold memberships."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobContext, JobRun, JobRunner
from cdp.warehouse import Warehouse
from loyalty import jobs, service
from loyalty.models import LedgerEntry, Member, Program
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, add_base_rule, earn, make_member, make_program
from tests.loyalty.identity_data import profile_of, resolve, write_events


def _base_rule(db: Database, program: Program) -> None:
    with db.begin() as session:
        add_base_rule(session, program)


def test_events_earn_for_the_profile_identity_resolved(db: Database, warehouse: Warehouse) -> None:
    program = make_program(db, enrolment="automatic")
    _base_rule(db, program)
    # An anonymous order, then a login that ties the device to an email: one person.
    write_events(
        warehouse,
        [
            ([("anonymous_id", "dev-1")], "Order Completed", 10),
            ([("anonymous_id", "dev-1"), ("email", "ann@example.com")], "Signed In", 0),
            ([("email", "ann@example.com")], "Order Completed", 5),
        ],
    )
    with db.begin() as session:
        before, mark = service.sync_program(session, warehouse, program_id=program.id)
    # Nothing resolved yet: nothing is read, the mark stays put.
    assert (before.events, mark) == (0, 0)
    resolve(warehouse)
    with db.begin() as session:
        result, mark = service.sync_program(session, warehouse, program_id=program.id)
        assert (result.credits, mark) == (2, 3)
        profile_id = profile_of(warehouse, "email", "ann@example.com")
        member = service.member_by_profile(session, program_id=program.id, profile_id=profile_id)
        assert service.member_balance(session, member_id=member.id)[1].active == 15
        assert session.scalar(select(func.count()).select_from(Member)) == 1


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_merge_in_identity_folds_two_memberships_after_the_loyalty_job(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    program = make_program(db)
    write_events(
        warehouse,
        [
            ([("anonymous_id", "dev-1")], "Page Viewed", 0),
            ([("email", "bob@example.com")], "Page Viewed", 0),
        ],
    )
    resolve(warehouse)
    device = profile_of(warehouse, "anonymous_id", "dev-1")
    email = profile_of(warehouse, "email", "bob@example.com")
    assert device != email
    first, second = make_member(db, program, device), make_member(db, program, email)
    earn(db, program, first, 30)
    earn(db, program, second, 12, at=T0 + timedelta(hours=1))
    write_events(
        warehouse, [([("anonymous_id", "dev-1"), ("email", "bob@example.com")], "Login", 0)]
    )
    resolve(warehouse)
    survivor = profile_of(warehouse, "email", "bob@example.com")
    assert survivor == profile_of(warehouse, "anonymous_id", "dev-1")
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    run = runner.run("loyalty.apply_merges", trigger="manual")
    assert run.status == "succeeded"
    with db.begin() as session:
        active = session.scalars(
            select(Member).where(Member.program_id == program.id, Member.status == "active")
        ).all()
        assert [m.profile_id for m in active] == [survivor]
        merged = session.scalars(select(Member).where(Member.status == "merged")).one()
        assert merged.merged_into == active[0].id
        assert service.member_balance(session, member_id=active[0].id)[1].active == 42
        # Both ledgers stay, each summing to its lots; the survivor's group spans both.
        members = {
            mid
            for mid in session.scalars(
                select(LedgerEntry.member_id).where(LedgerEntry.program_id == program.id)
            )
        }
        assert members == {first.id, second.id}
        assert set(service.member_group(session, member_id=active[0].id)) == members
        stored = session.get(Program, program.id)
        assert stored is not None
        assert stored.last_merge_seq > 0
    # Running the job again applies nothing twice.
    runner.run("loyalty.apply_merges", trigger="manual")
    with db.begin() as session:
        assert service.member_balance(session, member_id=active[0].id)[1].active == 42
    runner.shutdown()


def test_member_lookup_by_any_identifier_normalises_like_identity(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    write_events(
        warehouse,
        [([("email", "cara@example.com"), ("loyalty_card", "C-77")], "Signed Up", 0)],
    )
    resolve(warehouse)
    member = make_member(db, program, profile_of(warehouse, "email", "cara@example.com"))
    url = f"/api/loyalty/programs/{program.id}/members/lookup"
    by_email = client.get(
        url, params={"kind": "email", "value": "  Cara@Example.COM "}, headers=loyalty_headers
    )
    assert by_email.status_code == 200
    assert by_email.json()["id"] == member.id
    by_card = client.get(
        url, params={"kind": "loyalty_card", "value": "C-77"}, headers=loyalty_headers
    )
    assert by_card.json()["id"] == member.id
    unknown = client.get(url, params={"kind": "email", "value": "x@y.z"}, headers=loyalty_headers)
    assert unknown.status_code == 404


def test_idle_scheduled_loyalty_runs_are_not_recorded(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    program = make_program(db, enrolment="automatic")
    _base_rule(db, program)
    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 10)])
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    try:
        first = runner.run("loyalty.process_events", trigger="schedule")
        assert (first.status, first.rows, first.message) == ("succeeded", 1, "1 credits")
        # Nothing new: every second (and every 30 s for merges) such runs would pile up.
        idle = runner.run("loyalty.process_events", trigger="schedule")
        merges = runner.run("loyalty.apply_merges", trigger="schedule")
        assert (idle.rows, idle.message, merges.rows, merges.message) == (0, None, 0, None)
        # A manual run is always kept, idle or not.
        manual = runner.run("loyalty.process_events", trigger="manual")
    finally:
        runner.shutdown()
    with db.begin() as session:
        kept = session.execute(select(JobRun.job, JobRun.id).order_by(JobRun.started_at)).all()
    assert [(job, run_id) for job, run_id in kept] == [
        ("loyalty.process_events", first.id),
        ("loyalty.process_events", manual.id),
    ]


def test_a_real_time_run_takes_the_events_loaded_while_it_worked(
    db: Database, warehouse: Warehouse, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events that arrive during a pass are taken by another pass of the same run, not left
    for the next tick; a pass that finds nothing new ends the run."""
    program = make_program(db, enrolment="automatic")
    _base_rule(db, program)
    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 10)])
    passes: list[int] = []
    one_pass = jobs._one_pass

    def counted(context: JobContext) -> jobs._Pass:
        passed = one_pass(context)
        passes.append(passed.credits)
        if len(passes) == 1:  # an order arrives while the first pass was working
            write_events(warehouse, [([("email", "bob@example.com")], "Order Completed", 7)])
        return passed

    monkeypatch.setattr(jobs, "_one_pass", counted)
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    try:
        run = runner.run("loyalty.process_events", trigger="schedule")
    finally:
        runner.shutdown()
    assert (run.status, run.rows, passes) == ("succeeded", 2, [1, 1, 0])
    with db.begin() as session:
        bob = profile_of(warehouse, "email", "bob@example.com")
        member = service.member_by_profile(session, program_id=program.id, profile_id=bob)
        assert service.member_balance(session, member_id=member.id)[1].active == 7
