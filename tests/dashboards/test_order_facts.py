"""The stored order facts follow new events, identity merges and erasures, and the members vs
non-members metric answers the same with and without them."""

from __future__ import annotations

from datetime import date, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from dashboards import order_facts
from identity import service as identity_service
from identity.rules import IdentityRules
from tests.dashboards.test_more_metrics import _values
from tests.identity.conftest import T0, Ev, EventWriter

DAY1 = T0.date()


def _at(day: date, hour: int) -> datetime:
    return datetime.combine(day, datetime.min.time()) + timedelta(hours=hour)


def _order(ident: tuple[str, str], when: datetime, **props: object) -> Ev:
    return Ev([ident], type="track", event="Order Completed", at=when, properties=dict(props))


def _facts(warehouse: Warehouse) -> list[tuple[object, ...]]:
    return warehouse.rows(
        Query("SELECT event_id, ordered_at, amount FROM dashboards_order_facts ORDER BY 1")
    )


def _resolve(warehouse: Warehouse) -> None:
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())


def test_order_facts_follow_new_events_and_merges(db: Database, warehouse: Warehouse) -> None:
    events = EventWriter(warehouse)
    a0, a1 = ("anonymous_id", "a0"), ("anonymous_id", "a1")
    first = events.write(
        [
            _order(a0, _at(DAY1, 9), total=50.0),
            _order(a1, _at(DAY1, 10), revenue="20.5"),
            Ev([a0], type="track", event="Product Viewed", at=_at(DAY1, 8)),
        ]
    )
    _resolve(warehouse)
    assert order_facts.mark(warehouse) == -1
    live = _values(db, warehouse, "member_vs_non_member", DAY1, DAY1)  # read from events
    assert live[(DAY1, "non-members: purchases per customer")] == 1.0

    assert order_facts.refresh(warehouse) == 2
    assert order_facts.mark(warehouse) == first[-1]
    assert _facts(warehouse) == [(first[0], _at(DAY1, 9), 50.0), (first[1], _at(DAY1, 10), 20.5)]
    assert _values(db, warehouse, "member_vs_non_member", DAY1, DAY1) == live
    assert order_facts.refresh(warehouse) == 0  # nothing new

    # New events: an order of day 2 with no amount, and a user who is both a0 and a1, so
    # identity merges the two buyers into one profile.
    u = ("user_id", "u")
    later = events.write(
        [
            _order(a0, _at(DAY1 + timedelta(days=1), 9)),
            Ev([u, a0], type="identify", at=_at(DAY1, 11)),
            Ev([u, a1], type="identify", at=_at(DAY1, 12)),
        ]
    )
    _resolve(warehouse)
    assert len({identity_service.lookup(warehouse, kind=k, value=v) for k, v in (a0, a1)}) == 1
    expected = {
        (DAY1, "non-members: average basket"): 35.25,
        (DAY1, "non-members: purchases per customer"): 2.0,  # one buyer now
        (DAY1, "non-members: spend per customer"): 70.5,
        (DAY1 + timedelta(days=1), "non-members: purchases per customer"): 1.0,
    }
    # Before the refresh the new order comes from `events` above the mark; after it, from the
    # facts; the merge needs no rewrite of the stored facts either way.
    assert _values(db, warehouse, "member_vs_non_member", DAY1, DAY1 + timedelta(days=1)) == (
        pytest.approx(expected)
    )
    stored = _facts(warehouse)
    assert order_facts.refresh(warehouse) == 1
    assert order_facts.mark(warehouse) == later[-1]
    assert _facts(warehouse) == [*stored, (later[0], _at(DAY1 + timedelta(days=1), 9), 0.0)]
    assert _values(db, warehouse, "member_vs_non_member", DAY1, DAY1 + timedelta(days=1)) == (
        pytest.approx(expected)
    )

    # An erased order (its event deleted) leaves the facts at the next refresh.
    warehouse.execute(Query("DELETE FROM events WHERE event_id = $e", {"e": first[1]}))
    assert order_facts.refresh(warehouse) == 0
    assert [r[0] for r in _facts(warehouse)] == [first[0], later[0]]


def test_order_facts_job_appends_new_orders(
    client: TestClient, warehouse: Warehouse, admin_headers: dict[str, str]
) -> None:
    events = EventWriter(warehouse)
    ids = events.write([_order(("user_id", f"u{i}"), _at(DAY1, 9 + i), total=i) for i in range(3)])
    runs = []
    for _ in range(2):
        run = client.post(
            "/api/jobs/dashboards.order_facts/run", params={"wait": "true"}, headers=admin_headers
        )
        assert run.status_code == 202, run.text
        runs.append(run.json())
    assert [(r["status"], r["rows"]) for r in runs] == [("succeeded", 3), ("succeeded", 0)]
    assert [r[0] for r in _facts(warehouse)] == ids
    assert order_facts.mark(warehouse) == ids[-1]
