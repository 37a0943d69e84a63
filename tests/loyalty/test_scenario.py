"""Partial refund after a partial redemption after a tier upgrade, with the sums done by hand."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from cdp.db import Database
from loyalty import engine, ledger, service
from loyalty.models import LedgerEntry, Lot, Program, Tier
from loyalty.schemas import RewardCreate, RuleCreate, TierCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, make_member, make_program
from tests.loyalty.events import ev, frame

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)

NOW = T0 + timedelta(days=10)


def _process(db: Database, program: Program, row: dict[str, Any]) -> None:  # Any: event row
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        at = row["timestamp"] + timedelta(minutes=1)
        engine.process_events(session, program=stored, events=frame([row]), now=at)


def test_partial_refund_after_partial_redemption_after_tier_upgrade(db: Database) -> None:
    program = make_program(db, tier_metric="points", tier_grace_days=0)
    member = make_member(db, program, "ann")
    with db.begin() as session:
        silver = service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Silver", rank=1, threshold=100)
        ).id
        gold = service.create_tier(
            session,
            program_id=program.id,
            data=TierCreate(name="Gold", rank=2, threshold=300, multiplier=1.5),
        ).id
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="1 pt per euro", event_name="Order Completed", formula={"type": "per_amount"}
            ),
        )
        reward = service.create_reward(
            session, program_id=program.id, data=RewardCreate(name="Bag", points_cost=300)
        ).id

    # 250 EUR at no tier: 250 points, 250 qualifying -> Silver (>= 100).
    _process(db, program, ev("ann", T0, event_id=1, order_id="o1", total=250))
    # 80 EUR as Silver (x1): 80 points, 330 qualifying -> Gold (>= 300).
    _process(db, program, ev("ann", T0 + timedelta(days=1), event_id=2, order_id="o2", total=80))
    # 100 EUR as Gold (x1.5): 150 points; balance 480, qualifying 480.
    _process(db, program, ev("ann", T0 + timedelta(days=2), event_id=3, order_id="o3", total=100))
    with db.begin() as session:
        assert service.get_member(session, member_id=member.id).tier_id == gold
        lots = {lot.order_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {"o1": 250, "o2": 80, "o3": 150}

    # Redeem 300: oldest lots first -> o1 250 (empty), o2 50 (30 left); balance 180.
    with db.begin() as session:
        service.redeem(session, member_id=member.id, reward_id=reward, now=T0 + timedelta(days=3))
    with db.begin() as session:
        lots = {lot.order_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {"o1": 0, "o2": 30, "o3": 150}
        assert service.qualifying_points(session, member_id=member.id) == 480

    # 40 of o3's 100 EUR refunded: 40% of its 150 points = 60, from o3's own lot.
    _process(
        db,
        program,
        ev("ann", T0 + timedelta(days=4), "Order Refunded", 4, order_id="o3", total=40),
    )
    with db.begin() as session:
        lots = {lot.order_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {"o1": 0, "o2": 30, "o3": 90}
        assert ledger.lots_sum(session, member_id=member.id) == 120
        assert service.qualifying_points(session, member_id=member.id) == 420

    # Half of o1 refunded: 125 points; o1's lot is spent, so o2's 30 and o3's 90 are taken
    # and the 5 the balance cannot cover are recorded as unrecovered. Qualifying 295.
    _process(
        db,
        program,
        ev("ann", T0 + timedelta(days=5), "Order Refunded", 5, order_id="o1", total=125),
    )
    with db.begin() as session:
        lots = {lot.order_id: lot.remaining for lot in session.scalars(select(Lot))}
        assert lots == {"o1": 0, "o2": 0, "o3": 0}
        assert ledger.lots_sum(session, member_id=member.id) == 0
        assert ledger.entries_sum(session, member_id=member.id) == 0
        reversals = session.execute(
            select(LedgerEntry.order_id, LedgerEntry.points, LedgerEntry.unrecovered)
            .where(LedgerEntry.kind == "reverse")
            .order_by(LedgerEntry.occurred_at)
        ).all()
        assert [tuple(r) for r in reversals] == [("o3", -60, 0), ("o1", -120, 5)]
        assert service.qualifying_points(session, member_id=member.id) == 295
        # Below Gold's 300, but downgrades wait for the re-evaluation.
        assert service.get_member(session, member_id=member.id).tier_id == gold
        moves = service.reevaluate_tiers(session, program_id=program.id, now=NOW)
        assert [(m.reason, m.to_tier_id) for m in moves] == [("downgrade", silver)]
        history = [
            (c.reason, c.to_tier_id) for c in service.tier_history(session, member_id=member.id)
        ]
        assert history == [("upgrade", silver), ("upgrade", gold), ("downgrade", silver)]
        assert session.get(Tier, silver) is not None
