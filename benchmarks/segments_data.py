"""A synthetic shop of N customers for the segments benchmarks, generated column-wise (numpy).

Per customer: one identify (user_id + email, traits country/age/birthday/vip), about two
orders (revenue or total), refunds for one order in ten (half of them partial), about six
page/screen views and three product views. Timestamps spread over the last 900 days.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl

from cdp.config import Settings
from cdp.warehouse import Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules

COUNTRIES = np.array(["FR", "DE", "ES", "IT", "NL", "BE"])
CATEGORIES = np.array(["shoes", "bags", "hats", "coats", "socks"])


def _events(n: int, now: datetime, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    span_s = 900 * 86400

    def block(kind: str, event: str | None, per: float) -> pl.DataFrame:
        counts = rng.poisson(per, n)
        owner = np.repeat(np.arange(n), counts)
        ts = pl.lit(now) - pl.duration(
            seconds=pl.lit(pl.Series(rng.integers(0, span_s, owner.size)))
        )
        return pl.DataFrame({"owner": owner}).with_columns(
            type=pl.lit(kind), event=pl.lit(event, dtype=pl.String), timestamp=ts
        )

    identify = pl.DataFrame({"owner": np.arange(n)}).with_columns(
        type=pl.lit("identify"),
        event=pl.lit(None, dtype=pl.String),
        timestamp=pl.lit(now) - pl.duration(seconds=pl.lit(pl.Series(rng.integers(0, span_s, n)))),
    )
    age = rng.integers(18, 85, n)
    identify = identify.with_columns(
        traits=pl.format(
            '{{"country":"{}","age":{},"birthday":"{}-{}-{}","vip":{}}}',
            pl.Series(COUNTRIES[rng.integers(0, len(COUNTRIES), n)]),
            pl.Series(age),
            pl.Series(2026 - age),
            pl.Series(rng.integers(1, 13, n)).cast(pl.String).str.zfill(2),
            pl.Series(rng.integers(1, 29, n)).cast(pl.String).str.zfill(2),
            pl.Series(np.where(rng.random(n) < 0.15, "true", "false")),
        ),
        properties=pl.lit("{}"),
    )
    orders = block("track", "Order Completed", 2.0)
    m = orders.height
    amount = np.round(rng.uniform(5, 300, m), 2)
    with_revenue = rng.random(m) < 0.7
    orders = orders.with_row_index("k").with_columns(
        order_id=pl.format("o{}", pl.col("k")),
        category=pl.Series(CATEGORIES[rng.integers(0, len(CATEGORIES), m)]),
        amount=pl.Series(amount),
        revenue=pl.Series(with_revenue),
    )
    refunds = orders.filter(pl.Series(rng.random(m) < 0.1)).with_columns(
        event=pl.lit("Order Refunded"),
        timestamp=pl.col("timestamp") + pl.duration(days=2),
    )
    partial = rng.random(refunds.height) < 0.5
    refunds = refunds.with_columns(
        properties=pl.when(pl.Series(partial))
        .then(
            pl.format('{{"order_id":"{}","revenue":{}}}', pl.col("order_id"), pl.col("amount") / 2)
        )
        .otherwise(pl.format('{{"order_id":"{}"}}', pl.col("order_id")))
    )
    orders = orders.with_columns(
        properties=pl.when(pl.col("revenue"))
        .then(
            pl.format(
                '{{"order_id":"{}","revenue":{},"category":"{}"}}',
                pl.col("order_id"),
                pl.col("amount"),
                pl.col("category"),
            )
        )
        .otherwise(
            pl.format(
                '{{"order_id":"{}","total":{},"category":"{}"}}',
                pl.col("order_id"),
                pl.col("amount"),
                pl.col("category"),
            )
        )
    )
    views = block("track", "Product Viewed", 3.0)
    views = views.with_columns(
        properties=pl.format(
            '{{"category":"{}","price":{}}}',
            pl.Series(CATEGORIES[rng.integers(0, len(CATEGORIES), views.height)]),
            pl.Series(rng.integers(1, 200, views.height)),
        )
    )
    pages = block("page", None, 4.0).with_columns(properties=pl.lit('{"path":"/"}'))
    screens = block("screen", None, 2.0).with_columns(properties=pl.lit('{"name":"home"}'))
    cols = ["owner", "type", "event", "timestamp", "properties"]
    rest = pl.concat(
        [
            orders.select(cols),
            refunds.select(cols),
            views.select(cols),
            pages.select(cols),
            screens.select(cols),
        ]
    ).with_columns(traits=pl.lit(None, dtype=pl.String))
    events = pl.concat([identify.select([*cols, "traits"]), rest]).with_row_index(
        "event_id", offset=1
    )
    events = events.with_columns(
        pl.col("event_id").cast(pl.Int64),
        message_id=pl.format("m{}", pl.col("event_id")),
        source_id=pl.lit("bench"),
        batch_id=pl.lit(1, dtype=pl.Int64),
        user_id=pl.format("u{}", pl.col("owner")),
        anonymous_id=pl.lit(None, dtype=pl.String),
        received_at=pl.col("timestamp"),
        context=pl.lit("{}"),
    )
    idents = pl.concat(
        [
            events.select("event_id", kind=pl.lit("user_id"), value=pl.col("user_id")),
            events.filter(pl.col("type") == "identify").select(
                "event_id", kind=pl.lit("email"), value=pl.format("u{}@bench.test", pl.col("owner"))
            ),
        ]
    )
    table = events.select(
        "event_id",
        "message_id",
        "source_id",
        "batch_id",
        "type",
        "event",
        "user_id",
        "anonymous_id",
        pl.col("timestamp").cast(pl.Datetime("us")),
        pl.col("received_at").cast(pl.Datetime("us")),
        "properties",
        "traits",
        "context",
    )
    return table, idents


def load_shop(warehouse: Warehouse, customers: int, *, now: datetime, seed: int = 1) -> int:
    """Generate and load the shop, then resolve identities; returns the number of events."""
    events, idents = _events(customers, now, seed)
    with warehouse.transaction() as cur:
        cur.register("bench_events", events.to_arrow())
        cur.execute("INSERT INTO events SELECT * FROM bench_events")
        cur.unregister("bench_events")
        cur.register("bench_idents", idents.to_arrow())
        cur.execute("INSERT INTO event_identifiers SELECT * FROM bench_idents")
        cur.unregister("bench_idents")
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())
    return events.height


NOW = datetime(2026, 11, 1) + timedelta(hours=12)
