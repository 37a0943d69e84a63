"""The real-time job reads what its members' past entries count toward their tier from the
members' entries index alone (SQLite), and counts it right."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import event

from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import service
from loyalty.schemas import TierCreate
from tests.loyalty.conftest import T0, add_base_rule, make_program
from tests.loyalty.events import ev
from tests.loyalty.test_backfill import _load_warehouse, profile_of

INDEX = "ix_loyalty_ledger_entry_member_created"


def test_tier_priors_of_a_real_time_batch_read_the_covering_index(
    db: Database, warehouse: Warehouse
) -> None:
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
        gold = service.create_tier(
            session,
            program_id=program.id,
            data=TierCreate(name="Gold", rank=1, threshold=320, multiplier=1),
        ).id
    # 100 points on days 0, 200 and 300 for each of two members: 300, never Gold.
    history = [
        ev(name, T0 + timedelta(days=day), event_id=i + 1, total=100, order_id=f"o{i}")
        for i, (name, day) in enumerate((n, d) for d in (0, 200, 300) for n in ("c0", "c1"))
    ]
    _load_warehouse(warehouse, history)
    with db.begin() as session:
        service.sync_program(session, warehouse, program_id=program.id)

    statements: list[tuple[str, Any]] = []  # Any: the driver's parameters

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "qualifying_points" in statement and "loyalty_member" in statement:
            statements.append((statement, parameters))

    # On day 400 the order of day 0 has left the year: c0 reaches Gold (200 + 130), c1 does
    # not (200 + 110; 410 had the whole history been counted).
    later = T0 + timedelta(days=400)
    batch = [
        ev("c0", later, event_id=10, total=130, order_id="n0"),
        ev("c1", later, event_id=11, total=110, order_id="n1"),
    ]
    _load_warehouse(warehouse, batch)
    event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.begin() as session:
            service.sync_program(session, warehouse, program_id=program.id)
    finally:
        event.remove(db.engine, "before_cursor_execute", capture)

    assert statements, "the batch read no tier priors"
    with db.begin() as session:
        for statement, parameters in statements:
            plan = session.connection().exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", parameters
            )
            details = [str(row[-1]) for row in plan]
            ledger_steps = [d for d in details if "loyalty_ledger_entry" in d]
            assert ledger_steps, details
            # Index-only: no entry is fetched from the table.
            assert all(f"USING COVERING INDEX {INDEX}" in d for d in ledger_steps), details
        tiers = {}
        for name in ("c0", "c1"):
            member = service.member_by_profile(
                session, program_id=program.id, profile_id=profile_of(warehouse, name)
            )
            tiers[name] = member.tier_id
    assert tiers == {"c0": gold, "c1": None}
