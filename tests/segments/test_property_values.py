"""Materialised property values: property filters read them instead of the events' JSON, with
exactly the same members (events after the mark, merges and erasures included)."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

import pytest

from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from segments import compiler, service
from tests.segments.conftest import NOW, Ev, profile_of, resolve, write_events

SETTINGS = SegmentsSettings()
D = timedelta(days=1)
CATEGORIES = ["shoes", "bags", "hats", "beauty"]


def _orders(rng: random.Random, users: list[str], n: int, tag: str) -> list[Ev]:
    """Orders with nested products (list of objects, with a list inside), a store, amounts
    that are sometimes text or missing, empty product lists and null values."""
    evs = []
    for k in range(n):
        user = rng.choice(users)
        products: list[dict[str, Any]] = [  # Any: JSON
            {
                "category": rng.choice([*CATEGORIES, None]),
                "price": rng.choice([5, 19.99, 45, 80, 120.5]),
                "size": rng.choice([42, "L", None]),
                "tags": rng.sample(["new", "sale", "eco"], rng.randint(0, 2)),
            }
            for _ in range(rng.randint(0, 3))
        ]
        props: dict[str, Any] = {"order_id": f"{tag}{k}", "products": products}  # Any: JSON
        if rng.random() < 0.8:
            props["store_id"] = f"S{rng.randint(1, 6):03d}"
        if rng.random() < 0.7:
            props["revenue"] = rng.choice([12.5, 80, 150.25, 300, None])
        if rng.random() < 0.1:
            props["coupon"] = None
        at = NOW - timedelta(days=rng.randint(0, 500), minutes=rng.randint(0, 1000))
        evs.append(Ev(user, "Order Completed", at=at, properties=props))
        if rng.random() < 0.1:
            evs.append(Ev(user, "Order Refunded", at=at + D, properties={"order_id": f"{tag}{k}"}))
    for _ in range(n // 2):
        cat = rng.choice(CATEGORIES)
        evs.append(Ev(rng.choice(users), "Product Viewed", properties={"category": cat}))
    return evs


RULES: list[dict[str, Any]] = [  # Any: rule JSON
    {
        "event": "Order Completed",
        "where": [{"property": "products[].category", "op": "eq", "value": "beauty"}],
    },
    {
        "event": "Order Completed",
        "where": [{"property": "products[].category", "op": "eq", "value": "shoes"}],
        "count": {"op": "at_least", "value": 2},
        "last_days": 365,
    },
    {
        "event": "Order Completed",
        "where": [{"property": "products[].category", "op": "neq", "value": "hats"}],
    },
    {
        "event": "Order Completed",
        "where": [{"property": "products[].category", "op": "exists", "value": False}],
    },
    {
        "event": "Order Completed",
        "where": [{"property": "products[].tags[]", "op": "in", "value": ["eco"]}],
    },
    {
        "event": "Order Completed",
        "where": [{"property": "products[].price", "op": "between", "value": [40, 100]}],
        "count": {"op": "exactly", "value": 1},
    },
    {
        "event": "Order Completed",
        "where": [{"property": "store_id", "op": "in", "value": ["S001", "S002", "S003"]}],
        "since": (NOW - 300 * D).isoformat(),
        "until": (NOW - 20 * D).isoformat(),
    },
    {
        "event": "Order Completed",
        "where": [{"property": "store_id", "op": "exists", "value": False}],
        "count": {"op": "at_most", "value": 1},
    },
    {
        "event": "Order Completed",
        "where": [{"property": "revenue", "op": "gte", "value": 100}],
        "performed": False,
    },
    {
        "event": "Order Completed",
        "where": [
            {"property": "properties.store_id", "op": "starts_with", "value": "S00"},
            {"property": "products[].category", "op": "eq", "value": "bags"},
            {"property": "revenue", "op": "exists"},
        ],
        "count": {"op": "at_least", "value": 2},
    },
    {
        "any": [
            {
                "event": "Product Viewed",
                "where": [{"property": "category", "op": "eq", "value": "hats"}],
            },
            {
                "not": {
                    "event": "Order Completed",
                    "where": [{"property": "order_id", "op": "contains", "value": "1"}],
                    "count": {"op": "exactly", "value": 0},
                }
            },
        ]
    },
    {
        "event": "Order Refunded",
        "where": [{"property": "order_id", "op": "starts_with", "value": "a"}],
    },
]


def _select(
    db: Database, warehouse: Warehouse, rule: Any, *, materialised: bool
) -> set[str]:  # Any: rule JSON
    fields = service._warehouse_fields(warehouse)
    values = fields.values if materialised else None
    with db.begin() as session:
        query = compiler.compile_rule_parts(
            service.parse_rule(rule),
            catalog=service._compile_catalog(fields),
            now=NOW,
            event_profiles_sql=lambda: service._event_profiles(fields),
            resolve_segment=service._resolver(session),
            property_values=values,
        ).query
    if materialised:
        assert compiler.PROPERTY_VALUES_TABLE in query.sql or "Product Viewed" in str(rule)
    else:
        assert compiler.PROPERTY_VALUES_TABLE not in query.sql
    return {str(r[0]) for r in warehouse.rows(query)}


def _check_all(db: Database, warehouse: Warehouse) -> list[set[str]]:
    results = []
    for i, rule in enumerate(RULES):
        with_values = _select(db, warehouse, rule, materialised=True)
        assert with_values == _select(db, warehouse, rule, materialised=False), i
        results.append(with_values)
    return results


@pytest.fixture
def shop(warehouse: Warehouse) -> Warehouse:
    rng = random.Random(5)
    users = [f"u{i}" for i in range(40)]
    write_events(warehouse, [Ev(u, type="identify", email=f"{u}@x.test") for u in users])
    write_events(warehouse, _orders(rng, users, 150, "a"))
    resolve(warehouse)
    service.refresh_catalog(warehouse)
    service.refresh_event_map(warehouse)
    return warehouse


def test_materialised_values_select_the_same_members(db: Database, shop: Warehouse) -> None:
    rows = service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    assert rows > 300
    values = service._warehouse_fields(shop).values
    assert values is not None
    assert ("Order Completed", "products[].category") in values.marks
    assert ("Order Completed", "products[].tags[]") in values.marks
    assert ("Order Refunded", "order_id") in values.marks
    assert not any(e == "Product Viewed" for e, _ in values.marks)
    results = _check_all(db, shop)
    # The rules mean something: each selects some profiles and leaves some out.
    everyone = len(shop.rows(Query("SELECT profile_id FROM profiles")))
    assert all(0 < len(r) < everyone for r in results), [len(r) for r in results]


def test_events_after_the_mark_merges_and_erasures(db: Database, shop: Warehouse) -> None:
    rng = random.Random(9)
    service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    before = _check_all(db, shop)
    # New orders after the mark (one with a path never seen before), anonymous shoppers who
    # then log in (their profiles merge into known ones): read from the JSON until the next
    # materialisation, from the values after it.
    anon = [f"anon{i}" for i in range(6)]
    new = _orders(rng, ["u1", "u2", "u3"], 40, "b")
    new += [
        Ev(a, "Order Completed", kind="anonymous_id", email=f"u{i}@x.test", properties=p)
        for i, a in enumerate(anon)
        for p in (
            {"order_id": f"c{i}", "store_id": "S001", "products": [{"category": "beauty"}]},
            {"order_id": f"d{i}", "store_id": "S002", "gift": {"wrap": "red"}},
        )
    ]
    write_events(shop, new)
    resolve(shop)
    service.refresh_catalog(shop)
    after = _check_all(db, shop)  # live event map (profiles changed), values up to the old mark
    assert after != before
    service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    values = service._warehouse_fields(shop).values
    assert values is not None
    assert ("Order Completed", "gift.wrap") in values.marks
    assert _check_all(db, shop) == after
    service.refresh_event_map(shop)
    assert _check_all(db, shop) == after
    # An erasure: the erased person's events are gone; their values stay until the next run.
    victim = profile_of(shop, "u1")
    with db.begin() as session:
        identity_service.erase_profile(session, shop, profile_id=victim, actor=None)
    erased = _check_all(db, shop)
    assert all(victim not in r for r in erased)
    assert any(victim in r for r in after)
    stale = Query(
        "SELECT count(*) FROM segment_property_values"
        " WHERE event_id NOT IN (SELECT event_id FROM events)"
    )
    assert shop.scalar(stale) > 0
    service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    assert shop.scalar(stale) == 0
    assert _check_all(db, shop) == erased


def test_the_compiled_rule_reads_the_values(db: Database, shop: Warehouse) -> None:
    """Tampering with the stored values changes the answer: the filter really reads them."""
    service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    rule = RULES[0]
    right = _select(db, shop, rule, materialised=True)
    shop.execute(Query("DELETE FROM segment_property_values WHERE path = 'products[].category'"))
    assert _select(db, shop, rule, materialised=True) == set()
    assert _select(db, shop, rule, materialised=False) == right != set()


def test_incremental_runs_add_only_the_new_events(db: Database, shop: Warehouse) -> None:
    first = service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    assert service.refresh_property_values(shop, settings=SETTINGS, now=NOW) == 0
    write_events(shop, _orders(random.Random(3), ["u5"], 5, "z"))
    added = service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    assert 0 < added < first
    total = shop.scalar(Query("SELECT count(*) FROM segment_property_values"))
    # The same rows as one run over every event.
    shop.execute(Query("DELETE FROM segment_property_values"))
    shop.execute(Query("DELETE FROM segment_property_paths"))
    shop.execute(Query("DELETE FROM segment_state WHERE name = 'property_values_mark'"))
    assert service.refresh_property_values(shop, settings=SETTINGS, now=NOW) == total


def test_a_changed_purchase_event_keeps_the_values_a_compiled_rule_reads(
    db: Database, shop: Warehouse
) -> None:
    """The settings name another purchase event: the old event's rows and marks stay (a rule
    compiled just before still finds them), its new events are read from their JSON, and the
    new purchase event is materialised from its first event."""
    service.refresh_property_values(shop, settings=SETTINGS, now=NOW)
    fields = service._warehouse_fields(shop)
    assert fields.values is not None
    with db.begin() as session:
        compiled = compiler.compile_rule_parts(
            service.parse_rule(RULES[0]),
            catalog=service._compile_catalog(fields),
            now=NOW,
            event_profiles_sql=lambda: service._event_profiles(fields),
            resolve_segment=service._resolver(session),
            property_values=fields.values,
        ).query
    assert compiler.PROPERTY_VALUES_TABLE in compiled.sql
    before = {str(r[0]) for r in shop.rows(compiled)}
    assert before

    other = SegmentsSettings.model_validate({"purchase": {"event": "Product Viewed"}})
    service.refresh_property_values(shop, settings=other, now=NOW)
    assert {str(r[0]) for r in shop.rows(compiled)} == before
    marks = service._warehouse_fields(shop).values
    assert marks is not None
    assert ("Product Viewed", "category") in marks.marks
    frozen = marks.marks[("Order Completed", "products[].category")]

    write_events(shop, _orders(random.Random(11), ["u7", "u8"], 30, "k"))
    resolve(shop)
    service.refresh_catalog(shop)
    service.refresh_property_values(shop, settings=other, now=NOW)
    marks = service._warehouse_fields(shop).values
    assert marks is not None
    assert marks.marks[("Order Completed", "products[].category")] == frozen
    assert marks.marks[("Product Viewed", "category")] > frozen
    _check_all(db, shop)
    viewed = {
        "event": "Product Viewed",
        "where": [{"property": "category", "op": "eq", "value": "hats"}],
    }
    assert _select(db, shop, viewed, materialised=True) == _select(
        db, shop, viewed, materialised=False
    )
