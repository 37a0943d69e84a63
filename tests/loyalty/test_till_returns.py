"""Till returns recorded as negative order lines reverse points exactly as `Order Refunded`."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from cdp.db import Database
from loyalty import engine, ledger, service
from loyalty.models import Activity, LedgerEntry, Program
from loyalty.schemas import RuleCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, make_member, make_program
from tests.loyalty.events import ev, frame

SALE_LINES = [
    {"sku": "A", "category": "shoes", "price": 30.0, "quantity": 2},
    {"sku": "B", "category": "hats", "price": 20.0, "quantity": 2},
]


def _programme(db: Database) -> Program:
    program = make_program(db)
    with db.begin() as session:
        for body in (
            {"name": "1 pt per euro", "formula": {"type": "per_amount", "rate": 1}},
            {
                "name": "first purchase",
                "formula": {"type": "fixed", "points": 50},
                "limit_per_member": 1,
            },
        ):
            service.create_rule(
                session,
                program_id=program.id,
                data=RuleCreate(event_name="Order Completed", **body),
            )
    make_member(db, program, "ann")
    return program


def _sale() -> dict[str, Any]:  # Any: a row
    return ev(
        "ann",
        T0,
        event_id=1,
        order_id="T1",
        transaction_id="T1",
        kind="sale",
        total=100.0,
        products=SALE_LINES,
    )


def _till_return(event_id: int, hours: int, lines: list[dict[str, Any]], **extra: Any) -> Any:
    """A return as the till exports it: an order row of negative quantities and total."""
    return ev(
        "ann",
        T0 + timedelta(hours=hours),
        "Order Completed",
        event_id,
        order_id=f"T{event_id}",
        transaction_id=f"T{event_id}",
        kind="refund",
        original_transaction_id="T1",
        products=[{**line, "quantity": -line["quantity"]} for line in lines],
        **extra,
    )


def _refund(event_id: int, hours: int, total: float) -> dict[str, Any]:  # Any: a row
    return ev(
        "ann", T0 + timedelta(hours=hours), "Order Refunded", event_id, order_id="T1", total=total
    )


def _run(db: Database, program: Program, rows: list[dict[str, Any]]) -> None:
    for row in rows:  # one at a time, as real time would
        with db.begin() as session:
            stored = session.get(Program, program.id)
            assert stored is not None
            engine.process_events(session, program=stored, events=frame([row]))


def _reversals(db: Database, program: Program) -> list[tuple[int, int, str | None]]:
    with db.begin() as session:
        rows = session.execute(
            select(LedgerEntry.points, LedgerEntry.qualifying_points, LedgerEntry.order_id)
            .where(LedgerEntry.program_id == program.id, LedgerEntry.kind == "reverse")
            .order_by(LedgerEntry.occurred_at)
        ).all()
    return [(int(p), int(q), o) for p, q, o in rows]


def _state(db: Database, program: Program) -> tuple[int, int, list[tuple[int, int]]]:
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id="ann")
        earned = session.scalars(
            select(LedgerEntry.points).where(
                LedgerEntry.program_id == program.id, LedgerEntry.kind == "earn"
            )
        ).all()
        activity = session.execute(
            select(Activity.spend, Activity.orders)
            .where(Activity.program_id == program.id)
            .order_by(Activity.occurred_at)
        ).all()
        return (
            ledger.entries_sum(session, member_id=member.id),
            sum(earned),
            [(int(s), int(o)) for s, o in activity],
        )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_negative_till_lines_reverse_like_order_refunded(db: Database) -> None:
    # Return 1: one pair of shoes, with a negative total (60 of 100 → 60% of 150 points).
    # Return 2: the rest, negative quantities only (no total): the amount comes from its lines.
    till = _programme(db)
    _run(
        db,
        till,
        [
            _sale(),
            _till_return(2, 5, [{**SALE_LINES[0], "quantity": 2}], total=-60.0),
            _till_return(3, 9, [SALE_LINES[1]]),
        ],
    )
    refunds = _programme(db)
    _run(db, refunds, [_sale(), _refund(2, 5, 60.0), _refund(3, 9, 40.0)])
    assert _reversals(db, till) == [(-90, -90, "T1"), (-60, -60, "T1")]
    assert _reversals(db, till) == _reversals(db, refunds)
    # The returns earned nothing (no base points, no second first-purchase bonus) and count
    # as negative spend, not orders; the one completing the return takes the order off.
    assert _state(db, till) == (0, 150, [(100, 1), (-60, 0), (-40, -1)])
    assert _state(db, till) == _state(db, refunds)


def test_a_partial_till_return_processed_in_one_batch_reverses_its_share(db: Database) -> None:
    program = _programme(db)
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        engine.process_events(
            session,
            program=stored,
            events=frame(
                [_sale(), _till_return(2, 5, [{**SALE_LINES[1], "quantity": 1}], total=-20.0)]
            ),
        )
        # 20 of 100 returned: round(150 * 0.2) = 30 points back; replaying changes nothing.
        engine.process_events(
            session,
            program=stored,
            events=frame([_till_return(2, 5, [{**SALE_LINES[1], "quantity": 1}], total=-20.0)]),
        )
    assert _reversals(db, program) == [(-30, -30, "T1")]


def test_an_order_with_a_positive_total_is_not_a_return(db: Database) -> None:
    program = _programme(db)
    # An exchange: one line back, a dearer one bought, net positive: an ordinary order.
    row = ev(
        "ann",
        T0,
        event_id=1,
        order_id="T9",
        total=15.0,
        products=[
            {"sku": "A", "price": 30.0, "quantity": -1},
            {"sku": "C", "price": 45.0, "quantity": 1},
        ],
    )
    _run(db, program, [row])
    assert _reversals(db, program) == []
    assert _state(db, program)[1] == 65
