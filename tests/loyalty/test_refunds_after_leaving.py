"""Refunds of members that left (unenrolled, opted out) still reverse what their orders earned.

Such members keep their points but neither earn nor redeem; a refund that arrives meanwhile
must take its order's points back (and lower spend and tier progress), or the member would
keep the points of returned goods once it enrols again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import polars as pl
import pytest
from sqlalchemy import select

from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import engine, service
from loyalty.models import Activity, LedgerEntry, Member, Program
from loyalty.schemas import MemberAction, TierCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, add_base_rule, make_member, make_program
from tests.loyalty.events import ev, frame
from tests.loyalty.test_backfill import _forget, _ledger, _load_warehouse, profile_of

DAY = timedelta(days=1)


def _programme(db: Database, **fields: Any) -> Program:  # Any: programme fields
    """1 point per unit spent, and a Silver tier at 150 qualifying points."""
    program = make_program(db, **fields)
    with db.begin() as session:
        add_base_rule(session, program)
        service.create_tier(
            session,
            program_id=program.id,
            data=TierCreate(name="Silver", rank=1, threshold=150.0),
        )
    return program


def _process(db: Database, program: Program, rows: list[dict[str, Any]] | pl.DataFrame) -> int:
    """Process events in one transaction, as real time would; the reversals written."""
    events = rows if isinstance(rows, pl.DataFrame) else frame(rows)
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        return engine.process_events(session, program=stored, events=events).reversals


def _leave(db: Database, program: Program, profile_id: str, action: MemberAction) -> None:
    with db.begin() as session:
        service.change_membership(
            session, program_id=program.id, profile_id=profile_id, action=action
        )


def _reversals(db: Database, program: Program) -> list[tuple[str | None, int, int]]:
    with db.begin() as session:
        rows = session.execute(
            select(LedgerEntry.order_id, LedgerEntry.points, LedgerEntry.qualifying_points)
            .where(LedgerEntry.program_id == program.id, LedgerEntry.kind == "reverse")
            .order_by(LedgerEntry.occurred_at)
        ).all()
    return [(o, int(p), int(q)) for o, p, q in rows]


def _activity(db: Database, program: Program) -> list[tuple[str | None, float, int]]:
    with db.begin() as session:
        rows = session.execute(
            select(Activity.order_id, Activity.spend, Activity.orders)
            .where(Activity.program_id == program.id)
            .order_by(Activity.occurred_at)
        ).all()
    return [(o, float(s), int(n)) for o, s, n in rows]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("action", ["opt_out", "unenrol"])
def test_a_refund_while_away_reverses_the_order_and_lowers_tier_progress(
    db: Database, action: MemberAction
) -> None:
    program = _programme(db)
    member = make_member(db, program, "ann")
    _process(
        db,
        program,
        [
            ev("ann", T0, event_id=1, order_id="o1", total=100),
            ev("ann", T0 + DAY, event_id=2, order_id="o2", total=80),
        ],
    )
    with db.begin() as session:
        before = service.tier_progress(session, member_id=member.id, now=T0 + 4 * DAY)
    assert before is not None
    assert (before.tier_name, before.value) == ("Silver", 180)
    _leave(db, program, "ann", action)
    # 40 of o1's 100 come back, then the whole of o2: 40 + 80 points reversed.
    refunds = [
        ev("ann", T0 + 2 * DAY, "Order Refunded", 3, order_id="o1", total=40),
        ev("ann", T0 + 3 * DAY, "Order Refunded", 4, order_id="o2"),
    ]
    assert _process(db, program, refunds) == 2
    assert _reversals(db, program) == [("o1", -40, -40), ("o2", -80, -80)]
    # Spend lowered by 40, and o2 no longer counts as an order.
    assert _activity(db, program) == [("o1", 100, 1), ("o2", 80, 1), ("o1", -40, 0), ("o2", 0, -1)]
    assert _process(db, program, refunds[1:]) == 0  # a replay while away changes nothing
    with db.begin() as session:
        back = service.change_membership(
            session, program_id=program.id, profile_id="ann", action="enrol"
        )
        assert (back.id, back.status) == (member.id, "active")
        _, balance = service.member_balance(session, member_id=member.id, now=T0 + 4 * DAY)
        after = service.tier_progress(session, member_id=member.id, now=T0 + 4 * DAY)
    assert balance.total == 60
    assert after is not None
    assert (after.tier_name, after.value) == ("Silver", 60)  # downgrades wait for the job
    assert _process(db, program, refunds) == 0  # nor does one once back
    assert _reversals(db, program) == [("o1", -40, -40), ("o2", -80, -80)]
    assert len(_activity(db, program)) == 4


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_refunds_while_opted_out_reverse_only_orders_earned_before(db: Database) -> None:
    program = _programme(db)
    make_member(db, program, "ann")
    _process(db, program, [ev("ann", T0, event_id=1, order_id="o1", total=100)])
    _leave(db, program, "ann", "opt_out")
    # o2 is bought while opted out: it earns nothing and records nothing, so its refund
    # (a till return naming it, then an `Order Refunded`) reverses nothing and records no
    # negative spend; o1's refund, in the same batch, is reversed.
    _process(
        db,
        program,
        [
            ev("ann", T0 + DAY, event_id=2, order_id="o2", total=70),
            ev(
                "ann",
                T0 + 2 * DAY,
                "Order Completed",
                3,
                order_id="t3",
                original_transaction_id="o2",
                total=-30,
            ),
            ev("ann", T0 + 2 * DAY, "Order Refunded", 4, order_id="o2", total=40),
            ev("ann", T0 + 3 * DAY, "Order Refunded", 5, order_id="o1", total=25),
        ],
    )
    assert _reversals(db, program) == [("o1", -25, -25)]
    assert _activity(db, program) == [("o1", 100, 1), ("o1", -25, 0)]


def _history(phase: int) -> list[dict[str, Any]]:  # Any: rows
    """Orders of ann and bob; then, while ann is opted out, her refunds (two partial ones of
    one order, a whole one, one sent without her card), an order of hers that earns nothing
    and its refund, and bob's ordinary activity."""
    at = T0 + timedelta(hours=1)
    if phase == 1:
        return [
            ev("ann", at, event_id=1, order_id="o1", total=120),
            ev("bob", at + DAY, event_id=2, order_id="o2", total=60),
            ev("ann", at + 2 * DAY, event_id=3, order_id="o3", total=90),
            ev("ann", at + 3 * DAY, event_id=4, order_id="o4", total=50),
        ]
    refund = "Order Refunded"
    return [
        ev("ann", at + 4 * DAY, refund, 5, order_id="o1", total=30),
        ev("bob", at + 4 * DAY, event_id=6, order_id="o6", total=200),
        ev("ann", at + 5 * DAY, event_id=7, order_id="o7", total=40),
        ev("ann", at + 5 * DAY, refund, 8, order_id="o1", total=50),
        ev("guest", at + 6 * DAY, refund, 9, order_id="o4"),
        ev("ann", at + 6 * DAY, refund, 10, order_id="o7", total=40),
        ev("bob", at + 7 * DAY, refund, 11, order_id="o2", total=60),
        ev("ann", at + 8 * DAY, refund, 12, order_id="o3"),
    ]


def _activity_rows(db: Database, program: Program) -> list[tuple[str, ...]]:
    with db.begin() as session:
        rows = session.execute(
            select(
                Member.profile_id,
                Activity.event_id,
                Activity.order_id,
                Activity.spend,
                Activity.orders,
                Activity.occurred_at,
            )
            .join(Member, Member.id == Activity.member_id)
            .where(Activity.program_id == program.id)
        ).all()
    return sorted(tuple(str(v) for v in r) for r in rows)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_refunds_while_opted_out_give_the_same_ledger_backfilled_or_one_by_one(
    db: Database, warehouse: Warehouse
) -> None:
    program = _programme(db, enrolment="automatic")
    first, second = _history(1), _history(2)
    _load_warehouse(warehouse, first)
    ann = profile_of(warehouse, "ann")
    with db.begin() as session:
        service.backfill(session, warehouse, program_id=program.id)
    _leave(db, program, ann, "opt_out")
    _load_warehouse(warehouse, second)
    with db.begin() as session:
        result, mark = service.backfill(session, warehouse, program_id=program.id)
    assert mark == len(first) + len(second)
    # o1 twice (30 then 50 of 120), o4 sent without the card, o3 whole; bob's o2.
    assert result.reversals == 5
    backfilled = (_ledger(db, program), _activity_rows(db, program))
    with db.begin() as session:
        refunds = session.execute(
            select(Activity.order_id, Activity.spend, Activity.orders)
            .join(Member, Member.id == Activity.member_id)
            .where(Member.profile_id == ann, Activity.orders <= 0)
            .order_by(Activity.occurred_at)
        ).all()
    # Her refunds lowered her spend and orders; o7's (never recorded) left no trace.
    assert [(o, abs(float(s)), int(n)) for o, s, n in refunds] == [
        ("o1", 30, 0),
        ("o1", 50, 0),
        ("o4", 0, -1),
        ("o3", 0, -1),
    ]
    _forget(db, program)
    events = service.read_events(
        warehouse,
        after_event_id=0,
        up_to_event_id=mark,
        names=["Order Completed", "Order Refunded"],
    ).sort("timestamp", "event_id")
    for i in range(events.height):
        if events["event_id"][i] == len(first) + 1:  # ann opts out at the same point
            _leave(db, program, ann, "opt_out")
        _process(db, program, events.slice(i, 1))
    assert (_ledger(db, program), _activity_rows(db, program)) == backfilled
