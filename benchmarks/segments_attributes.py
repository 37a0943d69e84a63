"""Refresh of the built-in computed attributes vs a hand-written DuckDB query of the same columns.

The project's figure is `segments.service.refresh_attributes` (definitions read from the
operational store, the statement compiled, the table replaced); the reference is one
hand-written statement computing the same eleven columns into another table, in the same run
on the same data. Both results are compared value by value.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from benchmarks.core import Measure, Result
from benchmarks.segments_data import NOW, load_shop
from cdp.config import SegmentsSettings
from cdp.db import Base, Database
from cdp.warehouse import Query, Warehouse
from migrations.models import load_all_models
from segments import service

ROUNDS = 3

AMOUNT = (
    "coalesce(TRY_CAST(properties->>'$.revenue' AS DOUBLE),"
    " TRY_CAST(properties->>'$.total' AS DOUBLE))"
)

# Identity's event -> profile rule, written by hand: the profile of the event's most trusted
# identifier that has one.
EVENT_PROFILES = """
        SELECT ei.event_id, arg_min(n.profile_id, (n.rank, n.node_id)) AS profile_id
        FROM event_identifiers ei
        JOIN identity_nodes n ON n.kind = ei.kind AND n.value = ei.value
        WHERE n.profile_id IS NOT NULL
        GROUP BY ei.event_id
"""


def reference_attributes(event_profiles: str, *, now: datetime) -> Query:
    """One hand-written statement computing the built-in attributes into a reference table.

    `event_profiles` is the SQL of the event -> profile map (a constant of the caller's).
    """
    return Query(
        f"""
    CREATE OR REPLACE TABLE bench_reference_attributes AS
    WITH ep AS ({event_profiles}),
    ev AS MATERIALIZED (
        SELECT ep.profile_id, e.event_id, e.type, e.event, e.timestamp, e.properties
        FROM events e JOIN ep ON ep.event_id = e.event_id
    ),
    orders AS (
        SELECT profile_id, timestamp, {AMOUNT} AS amount, properties->>'$.order_id' AS order_id
        FROM ev WHERE event = 'Order Completed'
    ),
    refunds AS (
        SELECT profile_id, properties->>'$.order_id' AS order_id, sum({AMOUNT}) AS amount,
               bool_or({AMOUNT} IS NULL) AS full_refund
        FROM ev WHERE event = 'Order Refunded' AND properties->>'$.order_id' IS NOT NULL
        GROUP BY ALL
    ),
    purchases AS (
        SELECT o.profile_id, o.timestamp, o.amount - coalesce(r.amount, 0) AS amount
        FROM orders o LEFT JOIN refunds r ON r.profile_id = o.profile_id AND r.order_id = o.order_id
        WHERE NOT coalesce(r.full_refund OR r.amount >= o.amount, FALSE)
    ),
    p_agg AS (
        SELECT profile_id, min(timestamp) AS first_purchase_at, max(timestamp) AS last_purchase_at,
               count(*) AS orders_count, count(*) FILTER (WHERE timestamp >= $cut) AS orders_365d,
               sum(amount) AS spend_total,
               sum(amount) FILTER (WHERE timestamp >= $cut) AS spend_365d,
               avg(amount) AS avg_basket
        FROM purchases GROUP BY ALL
    ),
    visits AS (
        SELECT profile_id, CAST(timestamp AS DATE) AS day, max(timestamp) AS ts
        FROM ev WHERE type IN ('page', 'screen') OR event = 'Order Completed' GROUP BY ALL
    ),
    v_agg AS (
        SELECT profile_id, max(ts) AS last_visit_at,
               count(*) FILTER (WHERE ts >= $cut) AS visits_365d
        FROM visits GROUP BY ALL
    ),
    e_agg AS (SELECT profile_id, min(timestamp) AS customer_since FROM ev GROUP BY ALL)
    SELECT p.profile_id, p_agg.first_purchase_at, p_agg.last_purchase_at, v_agg.last_visit_at,
           coalesce(p_agg.orders_count, 0) AS orders_count,
           coalesce(p_agg.orders_365d, 0) AS orders_365d,
           coalesce(v_agg.visits_365d, 0) AS visits_365d,
           coalesce(p_agg.spend_total, 0) AS spend_total,
           coalesce(p_agg.spend_365d, 0) AS spend_365d,
           p_agg.avg_basket, e_agg.customer_since,
           date_diff('day', CAST(p_agg.last_purchase_at AS DATE), $today)
               AS days_since_last_purchase
    FROM profiles p
    LEFT JOIN p_agg ON p_agg.profile_id = p.profile_id
    LEFT JOIN v_agg ON v_agg.profile_id = p.profile_id
    LEFT JOIN e_agg ON e_agg.profile_id = p.profile_id
    """,  # noqa: S608 - constant SQL (AMOUNT and the callers' constants)
        {"cut": now - timedelta(days=365), "today": now.date()},
    )


REFERENCE = reference_attributes(EVENT_PROFILES, now=NOW)


def same_attributes(warehouse: Warehouse) -> bool:
    project = warehouse.run(Query("SELECT * EXCLUDE (computed_at) FROM profile_attributes"))
    reference = warehouse.run(Query("SELECT * FROM bench_reference_attributes"))
    project = project.sort("profile_id")
    reference = reference.sort("profile_id").select(project.columns)
    for name in project.columns:
        a, b = project[name], reference[name]
        if a.dtype.is_float():
            diff = (a - b.cast(pl.Float64)).abs().fill_null(0).max()
            if a.is_null().to_list() != b.is_null().to_list() or float(diff or 0) > 1e-6:  # type: ignore[arg-type]
                return False
        elif a.cast(pl.String).to_list() != b.cast(pl.String).to_list():
            return False
    return True


def run(scale: int, workdir: Path) -> Result:
    """Generate `scale` customers, resolve them, then time both refreshes alternately."""
    load_all_models()
    result = Result("segments_attributes", scale)
    warehouse = Warehouse(workdir / "bench.duckdb", memory_limit="3GB").open()
    db = Database(f"sqlite:///{workdir / 'bench.sqlite3'}")
    Base.metadata.create_all(db.engine)
    settings = SegmentsSettings()
    try:
        started = time.perf_counter()
        events = load_shop(warehouse, scale, now=NOW)
        result.details["events"] = events
        result.details["load_and_resolve_s"] = round(time.perf_counter() - started, 2)
        project: list[float] = []
        reference: list[float] = []
        for _ in range(ROUNDS):
            with db.begin() as session:
                t0 = time.perf_counter()
                service.refresh_attributes(session, warehouse, settings=settings, now=NOW)
                project.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            warehouse.execute(REFERENCE)
            reference.append(time.perf_counter() - t0)
        result.add(
            Measure(
                "refresh of 11 built-in attributes (median of 3)",
                "s",
                statistics.median(project),
                statistics.median(reference),
                "hand-written DuckDB query, same columns",
            )
        )
        t0 = time.perf_counter()
        service.refresh_event_map(warehouse)
        result.details["event_map_s (segments index, built after the refresh)"] = round(
            time.perf_counter() - t0, 3
        )
        result.details["profiles"] = warehouse.scalar(Query("SELECT count(*) FROM profiles"))
        result.details["same_values"] = same_attributes(warehouse)
    finally:
        warehouse.close()
        db.dispose()
    return result
