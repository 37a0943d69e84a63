"""Property test: random earn, redeem, cancel, refund, expire, merge and replay sequences.

Redeem -> merge -> cancel runs are also drawn as one block of steps.

After every step, for every member: the ledger's entries sum to its lots' remaining points,
no lot is negative or above its points (so no balance is negative), and replaying an event
already processed changes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from cdp.db import Database
from cdp.errors import CdpError
from loyalty import engine, ledger, service
from loyalty.models import LedgerEntry, Lot, LotDraw, Member, Program, Redemption
from loyalty.schemas import RewardCreate
from tests.loyalty.conftest import T0, add_base_rule, make_program
from tests.loyalty.events import ev, frame

PROFILES = ("p0", "p1", "p2")

earn = st.tuples(st.just("earn"), st.sampled_from(PROFILES), st.integers(1, 200))
redeem = st.tuples(st.just("redeem"), st.sampled_from(PROFILES), st.sampled_from([0, 1, 2]))
cancel = st.tuples(st.just("cancel"), st.integers(0, 5), st.just(0))
refund = st.tuples(st.just("refund"), st.integers(0, 8), st.integers(1, 200))
expire = st.tuples(st.just("expire"), st.just(""), st.integers(0, 45))
merge = st.tuples(st.just("merge"), st.sampled_from(PROFILES), st.sampled_from(PROFILES))
replay = st.tuples(st.just("replay"), st.integers(0, 20), st.just(0))
Step = tuple[Any, ...]  # Any: a step's operands


def _redeem_merge_cancel(
    pair: tuple[str, str], spent: int, extra: int, reward: int, which: int
) -> list[Step]:
    """Both profiles earn, one redeems, it is merged into the other, a redemption is cancelled
    (five steps that single random steps rarely line up)."""
    absorbed, survivor = pair
    return [
        ("earn", absorbed, spent),
        ("earn", survivor, extra),
        ("redeem", absorbed, reward),
        ("merge", absorbed, survivor),
        ("cancel", which, 0),
    ]


redeem_merge_cancel = st.builds(
    _redeem_merge_cancel,
    st.permutations(PROFILES).map(lambda p: (p[0], p[1])),
    st.integers(10, 200),
    st.integers(1, 200),
    st.sampled_from([0, 1, 2]),
    st.integers(0, 5),
)
# Earning is drawn more often, so that redemptions, refunds and cancellations have points.
single = st.one_of(earn, earn, earn, redeem, redeem, cancel, refund, expire, merge, replay)
steps = st.lists(st.one_of(single.map(lambda step: [step]), redeem_merge_cancel), max_size=10).map(
    lambda blocks: [step for block in blocks for step in block][:18]
)


def _snapshot(db: Database, program_id: str) -> tuple[Any, ...]:
    with db.begin() as session:
        entries = session.execute(
            select(func.count(), func.coalesce(func.sum(LedgerEntry.points), 0)).where(
                LedgerEntry.program_id == program_id
            )
        ).one()
        lots = sorted(
            (lot.entry_id, lot.remaining, lot.member_id)
            for lot in session.scalars(select(Lot).where(Lot.program_id == program_id))
        )
    return tuple(entries), tuple(lots)


def _check(db: Database, program_id: str) -> None:
    with db.begin() as session:
        program = session.get(Program, program_id)
        assert program is not None
        members = session.scalars(select(Member).where(Member.program_id == program_id)).all()
        for member in members:
            assert ledger.entries_sum(session, member_id=member.id) == ledger.lots_sum(
                session, member_id=member.id
            )
            view = ledger.balance(session, program=program, member_id=member.id, now=T0)
            assert view.active >= 0
        for lot in session.scalars(select(Lot).where(Lot.program_id == program_id)):
            assert 0 <= lot.remaining <= lot.points
            drawn = session.scalar(
                select(func.coalesce(func.sum(LotDraw.points), 0)).where(
                    LotDraw.lot_id == lot.entry_id
                )
            )
            assert lot.remaining == lot.points - int(drawn or 0)
        for redemption in session.scalars(
            select(Redemption).where(Redemption.program_id == program_id)
        ):
            taken = session.get(LedgerEntry, redemption.entry_id)
            assert taken is not None
            assert taken.points == -redemption.points
            if redemption.cancel_entry_id is not None:
                # One entry per member holding the lots drawn on (a merge or split moves lots).
                given = session.scalar(
                    select(func.sum(LedgerEntry.points)).where(
                        LedgerEntry.redemption_id == redemption.id, LedgerEntry.kind == "refund"
                    )
                )
                assert given == redemption.points


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=steps)
# Found by Hypothesis: a refund whose profile's member was re-keyed by a merge, replayed after
# the merge back (it used to be skipped at first and reversed on the replay).
@example(
    ops=[
        ("earn", "p1", 1),
        ("merge", "p1", "p0"),
        ("refund", 0, 1),
        ("merge", "p0", "p1"),
        ("replay", 1, 0),
    ]
)
@example(
    ops=[
        ("earn", "p1", 80),
        ("earn", "p0", 5),
        ("merge", "p1", "p0"),
        ("refund", 0, 40),
        ("replay", 2, 0),
    ]
)
# Found by Hypothesis: cancelling a redemption after its member was merged away credited the
# give-back to the absorbed member while the lots it refilled were the survivor's.
@example(
    ops=[
        ("earn", "p0", 10),
        ("earn", "p1", 1),
        ("redeem", "p0", 0),
        ("merge", "p0", "p1"),
        ("cancel", 0, 0),
    ]
)
def test_random_ledger_histories_keep_the_invariants(
    db: Database, ops: list[tuple[Any, ...]]
) -> None:
    program = make_program(db, enrolment="automatic", expiry_policy="rolling", expiry_months=1)
    with db.begin() as session:
        add_base_rule(session, program)
        rewards = [
            service.create_reward(
                session, program_id=program.id, data=RewardCreate(name=f"r{cost}", points_cost=cost)
            ).id
            for cost in (10, 50, 120)
        ]
    processed: list[dict[str, Any]] = []  # Any: event rows
    orders: list[tuple[str, str]] = []
    for i, (kind, a, b) in enumerate(ops):
        at = T0 + timedelta(days=i)
        number = len(processed) + 1
        with db.begin() as session:
            stored = session.get(Program, program.id)
            assert stored is not None
            try:
                if kind == "earn":
                    row = ev(a, at, event_id=number, order_id=f"o{number}", total=b)
                    row["message_id"] = f"{program.id}:{number}"
                    engine.process_events(session, program=stored, events=frame([row]), now=at)
                    processed.append(row)
                    orders.append((a, f"o{number}"))
                elif kind == "refund" and orders:
                    who, order = orders[a % len(orders)]
                    row = ev(who, at, "Order Refunded", number, order_id=order, total=b)
                    row["message_id"] = f"{program.id}:{number}"
                    engine.process_events(session, program=stored, events=frame([row]), now=at)
                    processed.append(row)
                elif kind == "redeem":
                    member = service.find_member(session, program_id=program.id, profile_id=a)
                    if member is not None:
                        service.redeem(session, member_id=member.id, reward_id=rewards[b], now=at)
                elif kind == "cancel":
                    issued = session.scalars(
                        select(Redemption.id)
                        .where(Redemption.program_id == program.id, Redemption.status == "issued")
                        .order_by(Redemption.created_at, Redemption.id)
                    ).all()
                    if issued:
                        service.cancel_redemption(
                            session, redemption_id=issued[a % len(issued)], reason="t", now=at
                        )
                elif kind == "expire":
                    service.expire_points(
                        session, program_id=program.id, now=at + timedelta(days=b)
                    )
                elif kind == "merge" and a != b:
                    service.merge_profiles(
                        session, program_id=program.id, from_profile_id=a, to_profile_id=b, now=at
                    )
            except CdpError:
                pass
        if kind == "replay" and processed:
            before = _snapshot(db, program.id)
            row = processed[a % len(processed)]
            with db.begin() as session:
                stored = session.get(Program, program.id)
                assert stored is not None
                engine.process_events(session, program=stored, events=frame([row]), now=at)
            assert _snapshot(db, program.id) == before
        _check(db, program.id)
