"""Computed attributes: one statement over events and profiles, equal to a Polars recomputation."""

from __future__ import annotations

import math
from datetime import timedelta

import polars as pl
import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from segments import service
from segments.rules import AttributeDefinition
from tests.conftest import make_key
from tests.segments.conftest import NOW, Ev, profile_of, resolve, write_events
from tests.segments.data import event_frame, prop, purchases, shop_events, visits

SETTINGS = SegmentsSettings()

CUSTOM = {
    "top_viewed_category": AttributeDefinition(
        aggregation="most_frequent", events=["Product Viewed"], property="category"
    ),
    "categories_seen": AttributeDefinition(aggregation="count_distinct", property="category"),
    "cheap_views_180d": AttributeDefinition(
        aggregation="sum",
        events=["Product Viewed"],
        property="price",
        where=[{"property": "category", "op": "in", "value": ["shoes", "bags"]}],
        window_days=180,
    ),
    "max_price_seen": AttributeDefinition(
        aggregation="max", events=["Product Viewed"], property="price"
    ),
    "first_order_category": AttributeDefinition(
        aggregation="first", source="purchases", property="category"
    ),
    "days_since_first_page": AttributeDefinition(aggregation="days_since_first", types=["page"]),
}


def _compute(session_db: Database, warehouse: Warehouse) -> pl.DataFrame:
    with session_db.begin() as session:
        for name, definition in CUSTOM.items():
            service.create_attribute(
                session,
                name=name,
                description=None,
                definition=definition,
                settings=SETTINGS,
                actor="test",
            )
    with session_db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
    return warehouse.run(Query("SELECT * FROM profile_attributes")).sort("profile_id")


def _expected(warehouse: Warehouse) -> pl.DataFrame:
    ev = event_frame(warehouse)
    profiles = warehouse.run(Query("SELECT profile_id FROM profiles"))
    cut = NOW - timedelta(days=365)
    pur = purchases(ev)
    vis = visits(ev)
    per_purchase = pur.group_by("profile_id").agg(
        first_purchase_at=pl.col("timestamp").min(),
        last_purchase_at=pl.col("timestamp").max(),
        orders_count=pl.len(),
        orders_365d=(pl.col("timestamp") >= cut).sum(),
        spend_total=pl.col("net").sum(),
        spend_365d=pl.col("net").filter(pl.col("timestamp") >= cut).sum(),
        avg_basket=pl.col("net").mean(),
        first_order_category=pl.col("properties")
        .sort_by("timestamp", "event_id")
        .str.json_path_match("$.category")
        .drop_nulls()
        .first(),
    )
    per_visit = vis.group_by("profile_id").agg(
        last_visit_at=pl.col("timestamp").max(),
        visits_365d=(pl.col("timestamp") >= cut).sum(),
    )
    viewed = ev.filter(pl.col("event") == "Product Viewed").with_columns(
        category=prop("category"), price=prop("price").cast(pl.Float64)
    )
    counts = viewed.group_by("profile_id", "category").agg(n=pl.len())
    top = (
        counts.sort(["profile_id", "n", "category"], descending=[False, True, False])
        .group_by("profile_id", maintain_order=True)
        .agg(top_viewed_category=pl.col("category").first())
    )
    per_view = viewed.group_by("profile_id").agg(
        cheap_views_180d=pl.col("price")
        .filter(
            pl.col("category").is_in(["shoes", "bags"])
            & (pl.col("timestamp") >= NOW - timedelta(days=180))
        )
        .sum(),
        max_price_seen=pl.col("price").max(),
    )
    per_event = ev.group_by("profile_id").agg(
        customer_since=pl.col("timestamp").min(),
        categories_seen=prop("category").drop_nulls().n_unique(),
        first_page=pl.col("timestamp").filter(pl.col("type") == "page").min(),
    )
    out = profiles
    for frame in (per_purchase, per_visit, top, per_view, per_event):
        out = out.join(frame, on="profile_id", how="left")
    today = NOW.date()
    return out.with_columns(
        pl.col("orders_count", "orders_365d", "visits_365d", "categories_seen").fill_null(0),
        pl.col("spend_total", "spend_365d", "cheap_views_180d").fill_null(0.0),
        days_since_last_purchase=(
            pl.lit(today) - pl.col("last_purchase_at").dt.date()
        ).dt.total_days(),
        days_since_first_page=(pl.lit(today) - pl.col("first_page").dt.date()).dt.total_days(),
    ).sort("profile_id")


def test_attributes_equal_an_independent_polars_computation_for_every_profile(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(warehouse, shop_events(160))
    resolve(warehouse)
    got = _compute(db, warehouse)
    want = _expected(warehouse)
    assert got.height == want.height > 100
    assert got["profile_id"].to_list() == want["profile_id"].to_list()
    checked = 0
    for column in want.columns:
        if column in ("profile_id", "first_page"):
            continue
        for pid, a, b in zip(got["profile_id"], got[column], want[column], strict=True):
            if isinstance(b, float) and b is not None:
                assert a is not None, (column, pid)
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (column, pid, a, b)
            else:
                assert a == b, (column, pid, a, b)
            checked += 1
    # Every built-in and custom attribute was compared, and the data exercised them.
    assert set(want.columns) - {"profile_id", "first_page"} == set(got.columns) - {
        "profile_id",
        "computed_at",
    }
    assert checked > 2000
    assert want["orders_count"].sum() > 100
    assert want["top_viewed_category"].null_count() < want.height


def test_purchases_are_net_of_refunds_and_fully_refunded_orders_do_not_count(
    db: Database, seeded: Warehouse
) -> None:
    with db.begin() as session:
        service.refresh_attributes(session, seeded, settings=SETTINGS, now=NOW)
    alice = service.profile_attributes(seeded, profile_id=profile_of(seeded, "alice"))
    bob = service.profile_attributes(seeded, profile_id=profile_of(seeded, "bob"))
    dave = service.profile_attributes(seeded, profile_id=profile_of(seeded, "dave"))
    assert alice is not None
    assert bob is not None
    assert dave is not None
    # a3 (30) was refunded without an amount: a full refund. a2 has only `total`.
    assert alice["orders_count"] == 2
    assert alice["spend_total"] == 150.0
    assert alice["orders_365d"] == 1
    assert alice["spend_365d"] == 50.0
    assert alice["avg_basket"] == 75.0
    assert alice["last_purchase_at"] == NOW - timedelta(days=10)
    assert alice["days_since_last_purchase"] == 10
    # Two page views on one day, purchases on two other days in the year.
    assert alice["visits_365d"] == 3
    assert alice["last_visit_at"] == NOW - timedelta(days=3) + timedelta(hours=1)
    assert alice["customer_since"] == NOW - timedelta(days=900)
    # Bob's 80 order was partly refunded (30): it still counts, for 50.
    assert bob["orders_count"] == 1
    assert bob["spend_total"] == 50.0
    assert dave["orders_count"] == 0
    assert dave["spend_total"] == 0.0
    assert dave["last_purchase_at"] is None
    assert dave["avg_basket"] is None


def test_purchase_and_visit_definitions_follow_the_settings(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(
        warehouse,
        [
            Ev("x", "Checkout Done", properties={"amount": 12}),
            Ev("x", "Order Completed", properties={"revenue": 99}),
            Ev("x", None, type="page"),
        ],
    )
    resolve(warehouse)
    settings = SegmentsSettings(
        purchase={"event": "Checkout Done", "amount_properties": ["amount"]},
        visit={"event_types": ["screen"], "include_purchases": False},
    )
    with db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=settings, now=NOW)
    values = service.profile_attributes(warehouse, profile_id=profile_of(warehouse, "x"))
    assert values is not None
    assert values["spend_total"] == 12.0
    assert values["orders_count"] == 1
    assert values["visits_365d"] == 0


def test_refresh_if_stale_skips_until_profiles_or_definitions_change(
    db: Database, seeded: Warehouse
) -> None:
    with db.begin() as session:
        first = service.refresh_attributes_if_stale(session, seeded, settings=SETTINGS, now=NOW)
        again = service.refresh_attributes_if_stale(session, seeded, settings=SETTINGS, now=NOW)
    assert not first.skipped
    assert first.profiles == 4
    assert again.skipped
    write_events(seeded, [Ev("erin", "Order Completed", properties={"revenue": 5})])
    resolve(seeded)
    with db.begin() as session:
        after_events = service.refresh_attributes_if_stale(
            session, seeded, settings=SETTINGS, now=NOW
        )
    assert not after_events.skipped
    assert after_events.profiles == 5
    with db.begin() as session:
        service.create_attribute(
            session,
            name="views",
            description=None,
            definition=AttributeDefinition(aggregation="count", events=["Product Viewed"]),
            settings=SETTINGS,
            actor=None,
        )
    with db.begin() as session:
        after_definition = service.refresh_attributes_if_stale(
            session, seeded, settings=SETTINGS, now=NOW
        )
    assert not after_definition.skipped
    carol = service.profile_attributes(seeded, profile_id=profile_of(seeded, "carol"))
    assert carol is not None
    assert carol["views"] == 3


def _headers(db: Database, role: Role = Role.marketer) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(db, role)}"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_attributes_api_defines_refreshes_and_protects_builtins(
    client: TestClient, db: Database, warehouse: Warehouse
) -> None:
    write_events(
        warehouse,
        [Ev("a", "Product Viewed", properties={"price": 3}), Ev("a", None, type="page")],
    )
    resolve(warehouse)
    h = _headers(db)
    body = {
        "name": "views",
        "description": "Product views",
        "definition": {"aggregation": "count", "events": ["Product Viewed"]},
    }
    created = client.post("/api/attributes", json=body, headers=h)
    assert created.status_code == 201, created.text
    assert created.json()["type"] == "integer"
    assert created.json()["updated_by"] == "test marketer"
    assert client.post("/api/attributes", json=body, headers=h).status_code == 409
    builtin = {**body, "name": "spend_total"}
    clash = client.post("/api/attributes", json=builtin, headers=h)
    assert clash.status_code == 409
    assert clash.json()["error"]["code"] == "segments.attribute_conflict"
    bad_name = client.post("/api/attributes", json={**body, "name": "Views!"}, headers=h)
    assert bad_name.status_code == 422
    no_prop = client.post(
        "/api/attributes",
        json={"name": "s", "definition": {"aggregation": "sum"}},
        headers=h,
    )
    assert no_prop.status_code == 422
    assert "needs a property" in no_prop.text
    listed = client.get("/api/attributes", headers=h).json()
    names = [a["name"] for a in listed]
    assert names[:2] == ["first_purchase_at", "last_purchase_at"]
    assert names[-1] == "views"
    assert {a["name"]: a["builtin"] for a in listed}["spend_total"] is True
    refreshed = client.post("/api/attributes/refresh", headers=h)
    assert refreshed.status_code == 200
    assert refreshed.json()["profiles"] == 1
    values = service.profile_attributes(warehouse, profile_id=profile_of(warehouse, "a"))
    assert values is not None
    assert values["views"] == 1
    changed = client.put(
        "/api/attributes/views",
        json={"definition": {"aggregation": "sum", "property": "price"}},
        headers=h,
    )
    assert changed.status_code == 200
    assert changed.json()["type"] == "number"
    assert (
        client.put(
            "/api/attributes/spend_total", json={"definition": {"aggregation": "count"}}, headers=h
        ).status_code
        == 409
    )
    assert client.get("/api/attributes/nope", headers=h).status_code == 404
    assert client.delete("/api/attributes/views", headers=h).status_code == 204
    assert client.get("/api/attributes/views", headers=h).status_code == 404
    viewer = client.get("/api/attributes", headers=_headers(db, Role.viewer))
    assert viewer.status_code == 403
