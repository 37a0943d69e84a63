"""Nested trait and event-property paths: discovered into the catalogue, compiled, validated."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from segments import service
from segments.errors import InvalidRule
from tests.conftest import make_key
from tests.segments.conftest import NOW, Ev, profile_of, resolve, write_events

SETTINGS = SegmentsSettings()
D = timedelta(days=1)


def _order(user: str, days_ago: int, *products: tuple[str, float], method: str = "home") -> Ev:
    return Ev(
        user,
        "Order Completed",
        at=NOW - days_ago * D,
        properties={
            "order_id": f"{user}{days_ago}",
            "revenue": sum(p for _, p in products),
            "products": [{"category": c, "price": p, "tags": [c[:2]]} for c, p in products],
            "shipping": {"method": method, "address": {"city": "Lyon"}},
        },
    )


@pytest.fixture
def nested(warehouse: Warehouse) -> Warehouse:
    """Four people with nested traits (address, list of interests) and nested orders."""
    evs = [
        Ev(
            "ann",
            type="identify",
            at=NOW - 100 * D,
            traits={"address": {"city": "Paris", "zip": "75001"}, "interests": ["golf", "wine"]},
        ),
        Ev("bea", type="identify", at=NOW - 90 * D, traits={"address": {"city": "Lyon"}}),
        Ev("cid", type="identify", at=NOW - 80 * D, traits={"interests": ["wine"]}),
        Ev("dan", type="identify", at=NOW - 70 * D, traits={"address": {"city": "Paris"}}),
        _order("ann", 50, ("shoes", 80.0), ("bags", 20.0)),
        _order("ann", 40, ("shoes", 60.0), method="store"),
        _order("ann", 5, ("hats", 10.0)),
        _order("bea", 45, ("shoes", 120.0)),
        _order("bea", 44, ("bags", 200.0)),
        _order("cid", 30, ("hats", 15.0), ("hats", 12.0)),
        Ev(
            "dan", "Order Completed", at=NOW - 20 * D, properties={"order_id": "d1", "products": []}
        ),
    ]
    write_events(warehouse, evs)
    resolve(warehouse)
    service.refresh_catalog(warehouse)
    return warehouse


def _select(db: Database, warehouse: Warehouse, rule: Any) -> set[str]:  # Any: rule JSON
    with db.begin() as session:
        query = service.compile_segment_rule(
            session, warehouse, rule=service.parse_rule(rule), settings=SETTINGS, now=NOW
        )
    return set(warehouse.run(query)["profile_id"])


def _people(warehouse: Warehouse, *users: str) -> set[str]:
    return {profile_of(warehouse, u) for u in users}


def test_catalogue_lists_nested_paths_with_types(
    client: TestClient, nested: Warehouse, db: Database
) -> None:
    h = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}
    body = client.get("/api/segments/catalog", headers=h).json()
    fields = {f["name"]: f["type"] for f in body["fields"]}
    assert fields["traits.address.city"] == "string"
    assert fields["traits.address.zip"] == "string"
    assert fields["traits.interests[]"] == "string"
    # Containers are not fields themselves.
    assert "traits.address" not in fields
    assert "traits.interests" not in fields
    events = {e["event"]: {p["name"]: p["type"] for p in e["properties"]} for e in body["events"]}
    assert events["Order Completed"] == {
        "order_id": "string",
        "revenue": "number",
        "products[].category": "string",
        "products[].price": "number",
        "products[].tags[]": "string",
        "shipping.method": "string",
        "shipping.address.city": "string",
    }


def test_event_catalogue_grows_incrementally_like_a_full_rebuild(nested: Warehouse) -> None:
    write_events(
        nested,
        [
            Ev("eve", "Order Completed", properties={"gift": {"wrap": True}, "revenue": "n/a"}),
            Ev("eve", "Wishlist Added", properties={"items": [{"sku": "a"}]}),
        ],
    )
    service.refresh_catalog(nested)
    incremental = nested.rows(Query("SELECT * FROM segment_event_catalog ORDER BY ALL"))
    service.refresh_catalog(nested, full=True)
    assert nested.rows(Query("SELECT * FROM segment_event_catalog ORDER BY ALL")) == incremental
    events = service._warehouse_fields(nested).events
    assert events["Order Completed"]["gift.wrap"] == "boolean"
    # One text revenue among numbers: the property is compared as text from now on.
    assert events["Order Completed"]["revenue"] == "string"
    assert events["Wishlist Added"] == {"items[].sku": "string"}


@pytest.mark.parametrize(
    ("rule", "users"),
    [
        ({"field": "traits.address.city", "op": "eq", "value": "Paris"}, {"ann", "dan"}),
        ({"field": "traits.address.zip", "op": "starts_with", "value": "75"}, {"ann"}),
        ({"field": "traits.interests[]", "op": "eq", "value": "wine"}, {"ann", "cid"}),
        ({"field": "traits.interests[]", "op": "in", "value": ["golf", "ski"]}, {"ann"}),
        ({"field": "traits.interests[]", "op": "exists", "value": False}, {"bea", "dan"}),
        ({"not": {"field": "traits.address.city", "op": "eq", "value": "Paris"}}, {"bea", "cid"}),
        # Some product of some order was shoes, at least twice.
        (
            {
                "event": "Order Completed",
                "where": [{"property": "products[].category", "op": "eq", "value": "shoes"}],
                "count": {"op": "at_least", "value": 2},
            },
            {"ann"},
        ),
        # The `properties.` prefix is accepted; a list element compared as a number.
        (
            {
                "event": "Order Completed",
                "where": [{"property": "properties.products[].price", "op": "gt", "value": 100}],
            },
            {"bea"},
        ),
        (
            {
                "event": "Order Completed",
                "where": [
                    {"property": "shipping.method", "op": "eq", "value": "home"},
                    {"property": "products[].tags[]", "op": "eq", "value": "ha"},
                ],
                "count": {"op": "exactly", "value": 1},
            },
            {"ann", "cid"},
        ),
        # Absolute window; did not perform.
        (
            {
                "event": "Order Completed",
                "performed": False,
                "where": [{"property": "products[].category", "op": "eq", "value": "bags"}],
                "since": (NOW - 46 * D).isoformat(),
                "until": (NOW - 43 * D).isoformat(),
            },
            {"ann", "cid", "dan"},
        ),
        (
            {
                "event": "Order Completed",
                "where": [{"property": "products[].category", "op": "exists", "value": False}],
                "count": {"op": "at_most", "value": 0},
            },
            {"ann", "bea", "cid"},  # dan's one order lists no product
        ),
        (
            {
                "event": "Order Completed",
                "where": [{"property": "shipping.address.city", "op": "in", "value": ["Lyon"]}],
                "count": {"op": "at_most", "value": 2},
            },
            {"bea", "cid", "dan"},
        ),
    ],
)
def test_rules_on_nested_paths_select_the_right_people(
    db: Database,
    nested: Warehouse,
    rule: Any,  # Any: rule JSON
    users: set[str],
) -> None:
    assert _select(db, nested, rule) == _people(nested, *users)


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        (
            {
                "all": [
                    {"field": "traits.address.city", "op": "eq", "value": "Paris"},
                    {
                        "event": "Order Completed",
                        "where": [{"property": "products[].colour", "op": "eq", "value": "red"}],
                    },
                ]
            },
            "rule.all[1].where[0].property: unknown property 'products[].colour'",
        ),
        (
            {"field": "traits.address.street", "op": "eq", "value": "x"},
            "rule.field: unknown field 'traits.address.street'",
        ),
        (
            {"field": "traits.address", "op": "exists"},
            "rule.field: unknown field 'traits.address'",
        ),
        (
            {
                "event": "Order Completed",
                "where": [{"property": "products[].price", "op": "gt", "value": "cheap"}],
            },
            "rule.where[0].value: expected a number",
        ),
        (
            {"event": "Order Completed", "where": [{"property": "products[0].price", "op": "gt"}]},
            "rule.where[0].property: String should match pattern",
        ),
    ],
)
def test_bad_nested_paths_are_rejected_naming_the_rule_path(
    db: Database,
    nested: Warehouse,
    rule: Any,  # Any: rule JSON
    path: str,
) -> None:
    with pytest.raises(InvalidRule) as error:
        _select(db, nested, rule)
    assert str(error.value).startswith(path)


def test_hostile_values_in_nested_filters_stay_parameters(db: Database, nested: Warehouse) -> None:
    hostile = "x'); DROP TABLE events; --"
    rule = {
        "event": "Order Completed",
        "where": [{"property": "products[].category", "op": "in", "value": [hostile]}],
    }
    with db.begin() as session:
        query = service.compile_segment_rule(
            session, nested, rule=service.parse_rule(rule), settings=SETTINGS, now=NOW
        )
    assert hostile not in query.sql
    assert [hostile] in query.params.values()
    assert nested.run(query).is_empty()
    assert nested.scalar(Query("SELECT count(*) FROM events")) == 11
