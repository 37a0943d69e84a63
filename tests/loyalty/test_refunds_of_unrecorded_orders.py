"""A refund reverses only an order its member recorded: one bought while the member was away,
or before it enrolled, reverses nothing and records no negative spend or orders.

Such an order earned nothing and left no activity row, so an active member's refund of it
must leave the ledger, its activity and its tier progress as they were, in real time and
in a sync of several events at once alike. A refund of an order recorded by another member
is that member's (as a refund sent without any member's card is).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import service
from loyalty.models import Activity, LedgerEntry, Member, Program
from loyalty.schemas import MemberAction
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0
from tests.loyalty.events import ev, frame
from tests.loyalty.test_away_periods import BACK_AT, LEFT_AT, _change, _process
from tests.loyalty.test_backfill import _forget, _ledger, _load_warehouse, profile_of
from tests.loyalty.test_refunds_after_leaving import _activity_rows, _programme

DAY = timedelta(days=1)
REFUND = "Order Refunded"


def _reversals(db: Database, program: Program) -> list[tuple[str, str | None, int, int]]:
    with db.begin() as session:
        rows = session.execute(
            select(
                Member.profile_id,
                LedgerEntry.order_id,
                LedgerEntry.points,
                LedgerEntry.qualifying_points,
            )
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(LedgerEntry.program_id == program.id, LedgerEntry.kind == "reverse")
            .order_by(LedgerEntry.occurred_at)
        ).all()
    return [(str(m), o, int(p), int(q)) for m, o, p, q in rows]


def _activity(db: Database, program: Program, profile_id: str) -> list[tuple[Any, ...]]:
    with db.begin() as session:
        rows = session.execute(
            select(Activity.order_id, Activity.spend, Activity.orders)
            .join(Member, Member.id == Activity.member_id)
            .where(Activity.program_id == program.id, Member.profile_id == profile_id)
            .order_by(Activity.occurred_at)
        ).all()
    return [(o, float(s), int(n)) for o, s, n in rows]


def _standing(db: Database, program: Program, profile_id: str) -> tuple[int, float]:
    """The member's balance and tier metric a week after it came back."""
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id=profile_id)
        _, balance = service.member_balance(session, member_id=member.id, now=BACK_AT + 7 * DAY)
        progress = service.tier_progress(session, member_id=member.id, now=BACK_AT + 7 * DAY)
    assert progress is not None
    return balance.total, progress.value


def _returns_of(profile: str, order: str, at: Any, first_id: int) -> list[dict[str, Any]]:
    """A partial refund, a till return naming the sale and a whole refund of `order`."""
    return [
        ev(profile, at, REFUND, first_id, order_id=order, total=30),
        ev(
            profile,
            at + timedelta(hours=1),
            "Order Completed",
            first_id + 1,
            order_id=f"t{first_id + 1}",
            original_transaction_id=order,
            total=-20,
        ),
        ev(profile, at + DAY, REFUND, first_id + 2, order_id=order),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("metric", ["spend", "orders"])
@pytest.mark.parametrize("action", ["unenrol", "opt_out"])
def test_a_member_back_from_away_refunding_an_order_bought_while_away_changes_nothing(
    db: Database, action: MemberAction, metric: str
) -> None:
    program = _programme(db, tier_metric=metric)
    _change(db, program, "ann", "enrol", T0)
    _process(db, program, frame([ev("ann", T0 + DAY, event_id=1, order_id="o1", total=100)]))
    _change(db, program, "ann", action, LEFT_AT)
    _process(db, program, frame([ev("ann", LEFT_AT + DAY, event_id=2, order_id="o2", total=70)]))
    _change(db, program, "ann", "enrol", BACK_AT)
    before = _standing(db, program, "ann")
    assert before == (100, 100 if metric == "spend" else 1)
    # Back and active, she returns o2 (bought while away) in three ways, one at a time.
    for row in _returns_of("ann", "o2", BACK_AT + DAY, 3):
        assert _process(db, program, frame([row])).reversals == 0
    assert _reversals(db, program) == []
    assert _activity(db, program, "ann") == [("o1", 100, 1)]
    assert _standing(db, program, "ann") == before
    # A refund of o1, which she bought while active, is still reversed and lowers her spend.
    refund = ev("ann", BACK_AT + 3 * DAY, REFUND, 6, order_id="o1", total=40)
    assert _process(db, program, frame([refund])).reversals == 1
    assert _reversals(db, program) == [("ann", "o1", -40, -40)]
    assert _activity(db, program, "ann") == [("o1", 100, 1), ("o1", -40, 0)]
    assert _standing(db, program, "ann") == (60, 60 if metric == "spend" else 1)


def _history(phase: int) -> list[dict[str, Any]]:  # Any: rows
    """Carl buys c1 before he enrols (phase 1); once enrolled (phase 2) he buys c2 and returns
    c1 in three ways and part of c2; then bob, a member too, returns part of c2."""
    if phase == 1:
        return [ev("carl", T0, event_id=1, order_id="c1", total=80)]
    return [
        ev("carl", T0 + 2 * DAY, event_id=2, order_id="c2", total=50),
        *_returns_of("carl", "c1", T0 + 3 * DAY, 3),
        ev("carl", T0 + 5 * DAY, REFUND, 6, order_id="c2", total=20),
        ev("bob", T0 + 6 * DAY, REFUND, 7, order_id="c2", total=5),
    ]


def _enrol(db: Database, program: Program, profile_id: str) -> None:
    _change(db, program, profile_id, "enrol", T0 + DAY)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_refund_of_an_order_bought_before_enrolling_changes_nothing(
    db: Database, warehouse: Warehouse
) -> None:
    program = _programme(db, tier_metric="spend")
    first, second = _history(1), _history(2)
    _load_warehouse(warehouse, first + second)
    carl, bob = profile_of(warehouse, "carl"), profile_of(warehouse, "bob")
    events = service.read_events(
        warehouse, after_event_id=0, up_to_event_id=7, names=["Order Completed", REFUND]
    ).sort("timestamp", "event_id")

    # One by one, as each event arrives: c1 while carl is no member yet.
    _process(db, program, events.slice(0, 1))
    _enrol(db, program, carl)
    _enrol(db, program, bob)
    for i in range(1, events.height):
        _process(db, program, events.slice(i, 1))
    one_by_one = (_ledger(db, program), _activity_rows(db, program))
    # c1 earned nothing and recorded nothing: its returns reverse nothing and record no
    # negative spend. c2's partial refunds are reversed, bob's on carl, who bought it.
    assert _reversals(db, program) == [(carl, "c2", -20, -20), (carl, "c2", -5, -5)]
    assert _activity(db, program, carl) == [("c2", 50, 1), ("c2", -20, 0), ("c2", -5, 0)]
    assert _activity(db, program, bob) == []

    # A sync taking the events after c1 in one batch gives the same ledger and activity.
    _forget(db, program)
    with db.begin() as session:
        session.execute(update(Program).where(Program.id == program.id).values(last_event_id=0))
        _, mark = service.sync_program(session, warehouse, program_id=program.id, max_events=1)
    assert mark == 1
    _enrol(db, program, carl)
    _enrol(db, program, bob)
    with db.begin() as session:
        result, mark = service.sync_program(session, warehouse, program_id=program.id)
    assert (mark, result.reversals) == (7, 2)
    assert (_ledger(db, program), _activity_rows(db, program)) == one_by_one


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_member_s_refund_of_an_order_another_member_recorded_is_the_buyer_s(
    db: Database,
) -> None:
    program = _programme(db, tier_metric="spend")
    _change(db, program, "ann", "enrol", T0)
    _change(db, program, "bob", "enrol", T0)
    _process(
        db,
        program,
        frame(
            [
                ev("ann", T0 + DAY, event_id=1, order_id="o1", total=100),
                ev("bob", T0 + DAY, event_id=2, order_id="b1", total=60),
            ]
        ),
    )
    # Bob's card on the return of ann's order: the reversal and the lost spend are ann's.
    _process(db, program, frame([ev("bob", T0 + 2 * DAY, REFUND, 3, order_id="o1")]))
    assert _reversals(db, program) == [("ann", "o1", -100, -100)]
    assert _activity(db, program, "ann") == [("o1", 100, 1), ("o1", 0, -1)]
    assert _activity(db, program, "bob") == [("b1", 60, 1)]
