"""A random but seeded shop for the segments tests, and an independent Polars reading of it."""

from __future__ import annotations

import random
from datetime import timedelta

import polars as pl

from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from tests.segments.conftest import NOW, Ev

CATEGORIES = ["shoes", "bags", "hats", "coats"]
COUNTRIES = ["FR", "DE", "ES", "IT", None]


def shop_events(people: int, seed: int = 7) -> list[Ev]:
    """Orders (revenue, total or no amount), refunds (full, partial, unknown order), page and
    screen views, product views and identifies; some people share an email (merged profiles)."""
    rng = random.Random(seed)
    events: list[Ev] = []
    for i in range(people):
        user = f"u{i}"
        # Every seventh person also uses the email of the person before: two user ids could
        # meet; identity's default rules decide whether they merge.
        email = f"p{i - 1 if i % 7 == 0 and i else i}@shop.test" if rng.random() < 0.8 else None
        born = NOW - timedelta(days=rng.randint(0, 900), hours=rng.randint(0, 23))
        country = rng.choice(COUNTRIES)
        traits: dict[str, object] = {"age": rng.randint(18, 80)}
        if country:
            traits["country"] = country
        if rng.random() < 0.7:
            traits["birthday"] = (
                f"{rng.randint(1950, 2005)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
            )
        traits["vip"] = rng.random() < 0.2
        events.append(Ev(user, type="identify", at=born, traits=traits, email=email))
        span = max(1, (NOW - born).days)
        for k in range(rng.randint(0, 6)):
            at = born + timedelta(days=rng.randint(0, span), minutes=rng.randint(0, 1000))
            props: dict[str, object] = {
                "order_id": f"{user}-{k}",
                "category": rng.choice(CATEGORIES),
            }
            roll = rng.random()
            if roll < 0.6:
                props["revenue"] = round(rng.uniform(5, 300), 2)
            elif roll < 0.9:
                props["total"] = rng.randint(5, 300)
            events.append(Ev(user, "Order Completed", at=at, properties=props, email=email))
            refund = rng.random()
            if refund < 0.1:
                events.append(
                    Ev(
                        user,
                        "Order Refunded",
                        at=at + timedelta(days=2),
                        properties={"order_id": f"{user}-{k}"},
                    )
                )
            elif refund < 0.2:
                events.append(
                    Ev(
                        user,
                        "Order Refunded",
                        at=at + timedelta(days=3),
                        properties={"order_id": f"{user}-{k}", "revenue": 4.5},
                    )
                )
        if rng.random() < 0.1:
            events.append(
                Ev(
                    user,
                    "Order Refunded",
                    at=NOW - timedelta(days=1),
                    properties={"order_id": "nope", "total": 10},
                )
            )
        for _ in range(rng.randint(0, 8)):
            at = born + timedelta(days=rng.randint(0, span), hours=rng.randint(0, 12))
            kind = rng.choice(["page", "screen"])
            events.append(Ev(user, None, type=kind, at=at, properties={"path": "/"}))
        for _ in range(rng.randint(0, 5)):
            at = born + timedelta(days=rng.randint(0, span))
            events.append(
                Ev(
                    user,
                    "Product Viewed",
                    at=at,
                    properties={"category": rng.choice(CATEGORIES), "price": rng.randint(1, 99)},
                )
            )
    return events


def event_frame(warehouse: Warehouse) -> pl.DataFrame:
    """Every resolved event with its profile, read with identity's public function."""
    mapping = identity_service.event_profiles(warehouse, after_event_id=0)
    events = warehouse.run(
        Query(
            "SELECT event_id, type, event, timestamp, properties::VARCHAR AS properties FROM events"
        )
    )
    return events.join(mapping, on="event_id")


def prop(name: str) -> pl.Expr:
    """A top-level property as text."""
    return pl.col("properties").str.json_path_match(f"$.{name}")


def purchases(ev: pl.DataFrame) -> pl.DataFrame:
    """Orders net of refunds, fully refunded ones dropped (the documented definition)."""
    amount = pl.coalesce(
        prop("revenue").cast(pl.Float64, strict=False), prop("total").cast(pl.Float64, strict=False)
    )
    orders = ev.filter(pl.col("event") == "Order Completed").with_columns(
        amount=amount, order_id=prop("order_id")
    )
    refunds = (
        ev.filter((pl.col("event") == "Order Refunded") & prop("order_id").is_not_null())
        .with_columns(r=amount, order_id=prop("order_id"))
        .group_by("profile_id", "order_id")
        .agg(r_amount=pl.col("r").sum(), full=pl.col("r").is_null().any())
    )
    joined = orders.join(refunds, on=["profile_id", "order_id"], how="left")
    refunded = (pl.col("full") | (pl.col("r_amount") >= pl.col("amount"))).fill_null(False)
    return joined.filter(~refunded).with_columns(
        net=pl.col("amount") - pl.col("r_amount").fill_null(0.0)
    )


def visits(ev: pl.DataFrame) -> pl.DataFrame:
    """One row per profile and day with a page, screen or purchase event."""
    return (
        ev.filter(pl.col("type").is_in(["page", "screen"]) | (pl.col("event") == "Order Completed"))
        .with_columns(day=pl.col("timestamp").dt.date())
        .group_by("profile_id", "day")
        .agg(pl.col("timestamp").max())
    )
