"""A member that leaves (unenrols, opts out) and enrols again earns nothing for what it bought
while away, whichever path processes those events and whenever they arrive.

Processing events as they arrive skips the orders of a member away at that moment; a later
backfill, or a late event dated in the away period, must not award them either. Events
before the first enrolment still earn through a backfill (a programme's launch).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from sqlalchemy import select

from cdp.db import Database, as_utc
from cdp.warehouse import Warehouse
from loyalty import engine, service
from loyalty.models import Activity, LedgerEntry, Member, MemberStatusChange, Program
from loyalty.schemas import DryRunRequest, MemberAction, RuleCreate, SampleEvent, SampleMember
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, add_base_rule, make_program
from tests.loyalty.events import ev, frame
from tests.loyalty.test_backfill import _forget, _ledger, _load_warehouse, profile_of
from tests.loyalty.test_refunds_after_leaving import _activity_rows, _programme

DAY = timedelta(days=1)
LEFT_AT = T0 + 2 * DAY
BACK_AT = T0 + 4 * DAY


def _change(
    db: Database, program: Program, profile_id: str, action: MemberAction, now: datetime
) -> None:
    with db.begin() as session:
        service.change_membership(
            session, program_id=program.id, profile_id=profile_id, action=action, at=now, now=now
        )


def _process(db: Database, program: Program, events: pl.DataFrame) -> engine.ProcessResult:
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        return engine.process_events(session, program=stored, events=events, now=T0)


def _history() -> list[dict[str, Any]]:  # Any: rows
    """Ann buys (o1), leaves at LEFT_AT, buys twice while away (o2, o4) and returns part of
    o1, comes back at BACK_AT and buys again (o3), o2 comes back without her card and o4
    with it (a refund, then a till return); bob buys all along."""
    refund = "Order Refunded"
    return [
        ev("ann", T0 + DAY, event_id=1, order_id="o1", total=100),
        ev("bob", T0 + DAY, event_id=2, order_id="b1", total=30),
        ev("ann", LEFT_AT + DAY, event_id=3, order_id="o2", total=70),
        ev("ann", LEFT_AT + DAY, refund, 4, order_id="o1", total=20),
        ev("bob", LEFT_AT + DAY, event_id=5, order_id="b2", total=60),
        ev("ann", BACK_AT - timedelta(microseconds=1), event_id=6, order_id="o4", total=25),
        ev("ann", BACK_AT + DAY, event_id=7, order_id="o3", total=40),
        ev("bob", BACK_AT + DAY, event_id=8, order_id="b3", total=10),
        # Returned without her card once she is back: o2 earned and recorded nothing, so
        # this refund has no owner and is dropped (processed at the time, it was).
        ev("guest", BACK_AT + 2 * DAY, refund, 9, order_id="o2", total=70),
        # Her own returns of o4 once back: she is active, but o4 recorded nothing either, so
        # they reverse nothing and record no negative spend.
        ev("ann", BACK_AT + 2 * DAY, refund, 10, order_id="o4", total=10),
        ev(
            "ann",
            BACK_AT + 3 * DAY,
            event_id=11,
            order_id="t11",
            kind="refund",
            original_transaction_id="o4",
            total=-15,
        ),
    ]


def _earned(db: Database, program: Program, profile_id: str) -> list[tuple[str | None, int]]:
    with db.begin() as session:
        rows = session.execute(
            select(LedgerEntry.order_id, LedgerEntry.points)
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(
                LedgerEntry.program_id == program.id,
                LedgerEntry.kind == "earn",
                Member.profile_id == profile_id,
            )
            .order_by(LedgerEntry.occurred_at)
        ).all()
    return [(o, int(p)) for o, p in rows]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("action", ["unenrol", "opt_out"])
def test_a_backfill_over_an_away_period_gives_the_one_by_one_ledger(
    db: Database, warehouse: Warehouse, action: MemberAction
) -> None:
    program = _programme(db)
    rows = _history()
    _load_warehouse(warehouse, rows)
    ann, bob = profile_of(warehouse, "ann"), profile_of(warehouse, "bob")
    events = service.read_events(
        warehouse,
        after_event_id=0,
        up_to_event_id=len(rows),
        names=["Order Completed", "Order Refunded"],
    ).sort("timestamp", "event_id")

    # One by one, each event as it arrives, membership changes at their moments.
    _change(db, program, ann, "enrol", T0)
    _change(db, program, bob, "enrol", T0)
    for i in range(events.height):
        at = as_utc(events["timestamp"][i])
        if at >= LEFT_AT and _status(db, program, ann) == "active" and at < BACK_AT:
            _change(db, program, ann, action, LEFT_AT)
        if at >= BACK_AT and _status(db, program, ann) != "active":
            _change(db, program, ann, "enrol", BACK_AT)
        _process(db, program, events.slice(i, 1))
    one_by_one = (_ledger(db, program), _activity_rows(db, program))
    # o2 and o4 (away) earn nothing and record no activity, nor do their refunds, even those
    # she sent once back; o1's refund while away is reversed (20 of 100).
    assert _earned(db, program, ann) == [("o1", 100), ("o3", 40)]
    assert [r[2] for r in one_by_one[1] if r[0] == ann] == ["o1", "o1", "o3"]

    # The same history backfilled after the member came back.
    _forget(db, program)
    _change(db, program, ann, "enrol", T0)
    _change(db, program, bob, "enrol", T0)
    _change(db, program, ann, action, LEFT_AT)
    _change(db, program, ann, "enrol", BACK_AT)
    with db.begin() as session:
        result, _ = service.backfill(session, warehouse, program_id=program.id, now=T0)
    assert (_ledger(db, program), _activity_rows(db, program)) == one_by_one
    assert result.points == 100 + 40 + 30 + 60 + 10
    assert result.reversals == 1
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id=ann)
        _, balance = service.member_balance(session, member_id=member.id, now=BACK_AT + 2 * DAY)
    assert balance.total == 100 - 20 + 40


def _status(db: Database, program: Program, profile_id: str) -> str:
    with db.begin() as session:
        return service.member_by_profile(
            session, program_id=program.id, profile_id=profile_id
        ).status


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_late_event_dated_while_away_does_not_earn_once_back(db: Database) -> None:
    program = _programme(db)
    _change(db, program, "ann", "enrol", T0)
    _process(db, program, frame([ev("ann", T0 + DAY, event_id=1, order_id="o1", total=100)]))
    _change(db, program, "ann", "opt_out", LEFT_AT)
    _change(db, program, "ann", "enrol", BACK_AT)
    _process(db, program, frame([ev("ann", BACK_AT + DAY, event_id=2, order_id="o3", total=40)]))
    # Sent after she came back, dated while she was away: at the instant she left, and
    # just before she came back. Then one dated at the instant she came back, which earns.
    late = _process(
        db,
        program,
        frame(
            [
                ev("ann", LEFT_AT, event_id=3, order_id="o2", total=70),
                ev("ann", BACK_AT - timedelta(microseconds=1), event_id=4, order_id="o4", total=5),
                ev("ann", BACK_AT, event_id=5, order_id="o5", total=8),
            ]
        ),
    )
    assert (late.credits, late.points) == (1, 8)
    assert _earned(db, program, "ann") == [("o1", 100), ("o5", 8), ("o3", 40)]
    with db.begin() as session:
        orders = session.scalars(
            select(Activity.order_id)
            .where(Activity.program_id == program.id)
            .order_by(Activity.occurred_at)
        ).all()
    assert orders == ["o1", "o5", "o3"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_backfill_still_awards_the_history_before_the_first_enrolment(
    db: Database, warehouse: Warehouse
) -> None:
    program = make_program(db)
    with db.begin() as session:
        add_base_rule(session, program)
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="first purchase",
                event_name="Order Completed",
                formula={"type": "fixed", "points": 50},
                limit_per_member=1,
            ),
        )
    rows = [
        # carl buys long before enrolling; dave too, then leaves and comes back.
        ev("carl", T0, event_id=1, order_id="c1", total=10),
        ev("dave", T0, event_id=2, order_id="d1", total=20),
        ev("carl", T0 + DAY, event_id=3, order_id="c2", total=30),
        ev("dave", LEFT_AT + DAY, event_id=4, order_id="d2", total=40),
        ev("dave", BACK_AT + DAY, event_id=5, order_id="d3", total=5),
    ]
    _load_warehouse(warehouse, rows)
    carl, dave = profile_of(warehouse, "carl"), profile_of(warehouse, "dave")
    _change(db, program, carl, "enrol", T0 + 10 * DAY)
    _change(db, program, dave, "enrol", T0 + DAY)
    _change(db, program, dave, "unenrol", LEFT_AT)
    _change(db, program, dave, "enrol", BACK_AT)
    with db.begin() as session:
        service.backfill(session, warehouse, program_id=program.id, now=T0)
    assert sorted(_earned(db, program, carl)) == [("c1", 10), ("c1", 50), ("c2", 30)]
    # d1, before dave's first enrolment, earns (and takes the first-purchase bonus); d2,
    # while he was away, does not; d3, once back, does.
    assert sorted(_earned(db, program, dave)) == [("d1", 20), ("d1", 50), ("d3", 5)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_membership_changes_are_recorded_with_their_time(db: Database) -> None:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
    _process(db, program, frame([ev("ann", T0, event_id=1, order_id="o1", total=10)]))
    _change(db, program, "ann", "unenrol", T0 + DAY)
    _change(db, program, "ann", "opt_out", T0 + 2 * DAY)
    _change(db, program, "ann", "enrol", T0 + 3 * DAY)
    _change(db, program, "guest", "enrol", T0 + 4 * DAY)
    with db.begin() as session:
        service.merge_profiles(
            session,
            program_id=program.id,
            from_profile_id="guest",
            to_profile_id="ann",
            now=T0 + 5 * DAY,
        )
        service.anonymise_profile(
            session, program_id=program.id, profile_id="ann", now=T0 + 6 * DAY
        )
    with db.begin() as session:
        rows = session.execute(
            select(
                MemberStatusChange.member_id,
                MemberStatusChange.status,
                MemberStatusChange.at,
                MemberStatusChange.reason,
            ).order_by(MemberStatusChange.at)
        ).all()
        ids = dict(session.execute(select(Member.id, Member.merged_into)).all())
    ann = next(m for m, into in ids.items() if into is None)
    guest = next(m for m, into in ids.items() if into is not None)
    assert [tuple(r) for r in rows] == [
        (ann, "active", T0, "automatic"),
        (ann, "unenrolled", T0 + DAY, "unenrol"),
        (ann, "opted_out", T0 + 2 * DAY, "opt_out"),
        (ann, "active", T0 + 3 * DAY, "enrol"),
        (guest, "active", T0 + 4 * DAY, "enrol"),
        (guest, "merged", T0 + 5 * DAY, "merge"),
        (ann, "erased", T0 + 6 * DAY, "erasure"),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_merged_profile_s_events_follow_the_survivor_s_away_periods(db: Database) -> None:
    program = _programme(db)
    _change(db, program, "ann", "enrol", T0)
    _change(db, program, "guest", "enrol", T0)
    _change(db, program, "ann", "unenrol", LEFT_AT)
    _change(db, program, "ann", "enrol", BACK_AT)
    _change(db, program, "guest", "unenrol", T0 + 5 * DAY)
    with db.begin() as session:
        service.merge_profiles(
            session,
            program_id=program.id,
            from_profile_id="guest",
            to_profile_id="ann",
            now=T0 + 6 * DAY,
        )
    # Events of the guest's identifiers now come with ann's profile: ann's history decides.
    # T0 + 3 days: ann was away (nothing); T0 + 5.5 days: the guest had left, ann had not.
    result = _process(
        db,
        program,
        frame(
            [
                ev("ann", T0 + 3 * DAY, event_id=1, order_id="g1", total=70),
                ev("ann", T0 + 5 * DAY + DAY / 2, event_id=2, order_id="g2", total=30),
            ]
        ),
    )
    assert (result.credits, result.points) == (1, 30)
    assert _earned(db, program, "ann") == [("g2", 30)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_points_of_a_sync_count_only_what_it_wrote(db: Database, warehouse: Warehouse) -> None:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
    _load_warehouse(warehouse, [ev("a", T0, event_id=1, order_id="o1", total=10)])
    with db.begin() as session:
        first, _ = service.backfill(session, warehouse, program_id=program.id, now=T0)
    assert (first.credits, first.points) == (1, 10)
    _load_warehouse(warehouse, [ev("a", T0 + DAY, event_id=2, order_id="o2", total=5)])
    with db.begin() as session:
        # The same `now` as the first run: what was written before is still not counted.
        again, _ = service.backfill(session, warehouse, program_id=program.id, now=T0)
    assert (again.events, again.credits, again.points) == (2, 1, 5)
    with db.begin() as session:
        replay, _ = service.backfill(session, warehouse, program_id=program.id, now=T0)
    assert (replay.credits, replay.points) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_dry_run_judges_a_member_with_its_status_at_the_sample_s_time(db: Database) -> None:
    program = _programme(db)
    _change(db, program, "ann", "enrol", T0)
    _change(db, program, "ann", "unenrol", LEFT_AT)
    _change(db, program, "ann", "enrol", BACK_AT)
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id="ann")

        def points_at(at: datetime) -> int:
            request = DryRunRequest(
                event=SampleEvent(event="Order Completed", properties={"total": 12}, timestamp=at),
                member=SampleMember(member_id=member.id),
            )
            return service.dry_run(session, program_id=program.id, request=request).total_points

        assert [points_at(at) for at in (T0 + DAY, LEFT_AT + DAY, BACK_AT + DAY)] == [12, 0, 12]
