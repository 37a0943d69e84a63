"""The demo programme backfills a history and gives members balances and tiers."""

from __future__ import annotations

from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import service
from tests.loyalty.conftest import T0
from tests.loyalty.events import ev
from tests.loyalty.test_backfill import _load_warehouse, profile_of


def test_demo_programme_backfills_a_history(db: Database, warehouse: Warehouse) -> None:
    shoes = [{"category": "shoes", "price": 60.0, "quantity": 2}]
    _load_warehouse(
        warehouse,
        [
            ev("ann", T0, event_id=1, order_id="o1", total=120, products=shoes),
            ev("bob", T0, event_id=2, order_id="o2", total=30, products=[{"price": 30.0}]),
        ],
    )
    with db.begin() as session:
        program = service.create_demo_program(session)
        service.backfill(session, warehouse, program_id=program.id, now=T0)
        ann = service.member_by_profile(
            session, program_id=program.id, profile_id=profile_of(warehouse, "ann")
        )
        _, balance = service.member_balance(session, member_id=ann.id, now=T0)
        progress = service.tier_progress(session, member_id=ann.id, now=T0)
    # 120 EUR of shoes at double points + the first-purchase bonus, held 14 days.
    assert (balance.pending, balance.active) == (340, 0)
    assert progress is not None
    assert progress.tier_name == "Silver"
    assert progress.next_tier_name == "Gold"
