"""Compiled segments select exactly the profiles an independent Polars evaluation selects."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import Any

import polars as pl

from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from segments import service
from tests.segments.conftest import NOW, resolve, write_events
from tests.segments.data import event_frame, prop, shop_events

SETTINGS = SegmentsSettings()
TODAY = NOW.date()


def _trait(name: str) -> pl.Expr:
    return pl.col("traits").str.json_path_match(f"$.{name}")


def _next_birthday_within(text: str | None, days: int) -> bool:
    if text is None:
        return False
    born = date.fromisoformat(text[:10])
    for i in range(days + 1):
        d = TODAY + timedelta(days=i)
        if (d.month, d.day) == (born.month, born.day):
            return True
        leap = d.year % 4 == 0 and (d.year % 100 != 0 or d.year % 400 == 0)
        if (born.month, born.day) == (2, 29) and not leap and (d.month, d.day) == (3, 1):
            return True
    return False


def _event_counts(ev: pl.DataFrame, condition: pl.Expr) -> dict[str, int]:
    counts = ev.filter(condition).group_by("profile_id").len()
    return dict(zip(counts["profile_id"], counts["len"], strict=True))


Oracle = Callable[[pl.DataFrame, pl.DataFrame], set[str]]


def _cases() -> list[tuple[str, dict[str, Any], Oracle]]:  # Any: rule JSON
    """(name, rule, oracle) where the oracle reads profiles (with attributes) and events."""
    shoes = (pl.col("event") == "Order Completed") & (prop("category") == "shoes")
    recent_views = (pl.col("event") == "Product Viewed") & pl.col("timestamp").is_between(
        NOW - timedelta(days=60), NOW
    )
    orders = pl.col("event") == "Order Completed"
    pricey = (pl.col("event") == "Product Viewed") & (prop("price").cast(pl.Float64) > 50)

    def ids(frame: pl.DataFrame) -> set[str]:
        return set(frame["profile_id"])

    def by_events(condition: pl.Expr, keep: Callable[[int], bool]) -> Oracle:
        def oracle(p: pl.DataFrame, ev: pl.DataFrame) -> set[str]:
            counts = _event_counts(ev, condition)
            return {pid for pid in p["profile_id"] if keep(counts.get(pid, 0))}

        return oracle

    return [
        (
            "french",
            {"field": "traits.country", "op": "eq", "value": "FR"},
            lambda p, ev: ids(p.filter(_trait("country") == "FR")),
        ),
        (
            "older germans or spaniards",
            {
                "all": [
                    {"field": "traits.country", "op": "in", "value": ["DE", "ES"]},
                    {"field": "traits.age", "op": "gte", "value": 40},
                ]
            },
            lambda p, ev: ids(
                p.filter(
                    _trait("country").is_in(["DE", "ES"]) & (_trait("age").cast(pl.Float64) >= 40)
                )
            ),
        ),
        (
            "not vip (missing counts as not)",
            {"not": {"field": "traits.vip", "op": "eq", "value": True}},
            lambda p, ev: ids(p.filter((_trait("vip") == "true").fill_null(False).not_())),
        ),
        (
            "three orders or more",
            {"field": "attributes.orders_count", "op": "gte", "value": 3},
            lambda p, ev: ids(p.filter(pl.col("orders_count") >= 3)),
        ),
        (
            "spent 100 to 500",
            {"field": "attributes.spend_total", "op": "between", "value": [100, 500]},
            lambda p, ev: ids(p.filter(pl.col("spend_total").is_between(100, 500))),
        ),
        (
            "bought in the last 90 days",
            {"field": "attributes.last_purchase_at", "op": "in_last_days", "value": 90},
            lambda p, ev: ids(
                p.filter(pl.col("last_purchase_at").is_between(NOW - timedelta(days=90), NOW))
            ),
        ),
        (
            "lapsed: last purchase over 180 days ago",
            {"field": "attributes.last_purchase_at", "op": "more_than_days_ago", "value": 180},
            lambda p, ev: ids(p.filter(pl.col("last_purchase_at") < NOW - timedelta(days=180))),
        ),
        (
            "birthday in the next 30 days",
            {"field": "traits.birthday", "op": "birthday_in_next_days", "value": 30},
            lambda p, ev: {
                pid
                for pid, text in zip(
                    p["profile_id"], p.select(_trait("birthday")).to_series(), strict=True
                )
                if _next_birthday_within(text, 30)
            },
        ),
        (
            "two shoe orders",
            {
                "event": "Order Completed",
                "where": [{"property": "category", "op": "eq", "value": "shoes"}],
                "count": {"op": "at_least", "value": 2},
            },
            by_events(shoes, lambda n: n >= 2),
        ),
        (
            "no product view in 60 days",
            {"event": "Product Viewed", "performed": False, "last_days": 60},
            by_events(recent_views, lambda n: n == 0),
        ),
        (
            "at most one order",
            {"event": "Order Completed", "count": {"op": "at_most", "value": 1}},
            by_events(orders, lambda n: n <= 1),
        ),
        (
            "exactly two pricey views",
            {
                "event": "Product Viewed",
                "where": [{"property": "price", "op": "gt", "value": 50}],
                "count": {"op": "exactly", "value": 2},
            },
            by_events(pricey, lambda n: n == 2),
        ),
        (
            "F-country or frequent visitor",
            {
                "any": [
                    {"field": "traits.country", "op": "starts_with", "value": "F"},
                    {"field": "attributes.visits_365d", "op": "gte", "value": 5},
                ]
            },
            lambda p, ev: ids(
                p.filter(
                    _trait("country").str.starts_with("F").fill_null(False)
                    | (pl.col("visits_365d") >= 5)
                )
            ),
        ),
        (
            "no country",
            {"field": "traits.country", "op": "exists", "value": False},
            lambda p, ev: ids(p.filter(_trait("country").is_null())),
        ),
        (
            "first seen in the last 200 days",
            {"field": "profile.first_seen", "op": "in_last_days", "value": 200},
            lambda p, ev: ids(
                p.filter(pl.col("first_seen").is_between(NOW - timedelta(days=200), NOW))
            ),
        ),
    ]


def test_a_dozen_rules_agree_exactly_with_polars(db: Database, warehouse: Warehouse) -> None:
    write_events(warehouse, shop_events(300, seed=11))
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
    profiles = warehouse.run(
        Query(
            "SELECT p.profile_id, p.traits::VARCHAR AS traits, p.first_seen, a.*"
            " EXCLUDE (profile_id) FROM profiles p JOIN profile_attributes a USING (profile_id)"
        )
    )
    events = event_frame(warehouse)
    mismatches = {}
    sizes = {}
    for name, rule, oracle in _cases():
        with db.begin() as session:
            query = service.compile_segment_rule(
                session, warehouse, rule=service.parse_rule(rule), settings=SETTINGS, now=NOW
            )
        got = set(warehouse.run(query)["profile_id"])
        want = oracle(profiles, events)
        sizes[name] = len(want)
        if got != want:
            mismatches[name] = (len(got), len(want), sorted(got ^ want)[:3])
    assert mismatches == {}
    # Every rule selects someone and leaves someone out, so each comparison means something.
    assert all(0 < n < profiles.height for n in sizes.values()), sizes


def test_segment_membership_rules_agree_with_set_algebra(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(warehouse, shop_events(120, seed=5))
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
        french = service.create_segment(
            session,
            warehouse,
            name="french",
            description=None,
            rule={"field": "traits.country", "op": "eq", "value": "FR"},
            refresh_minutes=None,
            settings=SETTINGS,
            actor=None,
        )
        buyers = service.create_segment(
            session,
            warehouse,
            name="buyers",
            description=None,
            rule={"field": "attributes.orders_count", "op": "gte", "value": 1},
            refresh_minutes=None,
            settings=SETTINGS,
            actor=None,
        )
        rule = {"all": [{"segment": french.id}, {"segment": buyers.id, "member": False}]}
        combined = service.compile_segment_rule(
            session, warehouse, rule=service.parse_rule(rule), settings=SETTINGS, now=NOW
        )
        a = service.compile_segment_rule(
            session, warehouse, rule=service.parse_rule({"segment": french.id}), settings=SETTINGS
        )
        b = service.compile_segment_rule(
            session, warehouse, rule=service.parse_rule({"segment": buyers.id}), settings=SETTINGS
        )
    want = set(warehouse.run(a)["profile_id"]) - set(warehouse.run(b)["profile_id"])
    assert want
    assert set(warehouse.run(combined)["profile_id"]) == want
