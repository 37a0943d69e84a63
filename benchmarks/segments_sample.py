"""Segments on the generated sample: attribute refresh and ten typical segments vs hand-written
DuckDB SQL, and the preview time of each segment.

The data is a sample written by `cdp sample-data`, loaded through the connectors and resolved
by identity with `benchmarks.sample_warehouse` (set `CDP_BENCH_PREPARED` to a folder it
prepared, e.g. the 1M-customer one, to reuse it; otherwise a sample of `scale` customers is
generated and prepared in the work folder). The stores are copied into the work folder first,
since the benchmark writes.

- Attributes: `segments.service.refresh_attributes` (the eleven built-ins) against one
  hand-written statement computing the same columns into another table; values compared.
- Segments: compile + count of each rule through `segments.service` against a hand-written
  count over the same tables; counts compared. Preview: `service.preview` (count and a sample).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import sample_warehouse
from benchmarks.core import Measure, Result
from benchmarks.segments_attributes import reference_attributes, same_attributes
from benchmarks.segments_rules import resolve_refs, time_cases
from cdp import sample_data
from cdp.config import SegmentsSettings, Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from segments import service
from segments.compiler import birthday_codes

# The sample's reference date: its history ends here.
NOW = datetime(2026, 11, 1)


def _rounds() -> int:
    """Timed rounds of each figure (the median is reported); CDP_BENCH_ROUNDS, default 3."""
    return int(os.environ.get("CDP_BENCH_ROUNDS", "3"))


# Identity's event -> profile rule, written by hand: the profile of the event's most trusted
# identifier that has one.
EP_ALL = """
    SELECT ei.event_id, arg_min(n.profile_id, (n.rank, n.node_id)) AS profile_id
    FROM identity_event_nodes ei JOIN identity_nodes n ON n.node_id = ei.node_id
    WHERE n.profile_id IS NOT NULL
    GROUP BY ei.event_id
"""
# The same for the events of CTE `f` only.
EP_FOR = """
    SELECT ei.event_id, arg_min(n.profile_id, (n.rank, n.node_id)) AS profile_id
    FROM identity_event_nodes ei
    SEMI JOIN f ON f.event_id = ei.event_id
    JOIN identity_nodes n ON n.node_id = ei.node_id
    WHERE n.profile_id IS NOT NULL
    GROUP BY ei.event_id
"""

REFERENCE_ATTRIBUTES = reference_attributes(EP_ALL, now=NOW)

PARAMS: dict[str, object] = {
    "now": NOW,
    "cut60": NOW - timedelta(days=60),
    "cut90": NOW - timedelta(days=90),
    "cut365": NOW - timedelta(days=365),
    "codes": birthday_codes(NOW.date(), 7),
    "stores": ["S001", "S002", "S003", "S004", "S005"],
    "since": datetime(2025, 1, 1),
    "until": datetime(2026, 1, 1),
}

PARIS: dict[str, Any] = {  # Any: JSON
    "field": "traits.postcode",
    "op": "starts_with",
    "value": "75",
}
BIG: dict[str, Any] = {"field": "attributes.spend_365d", "op": "gte", "value": 500}  # Any: JSON

# name -> (rule, hand-written SQL returning the count)
CASES: dict[str, tuple[dict[str, Any], str]] = {  # Any: JSON
    "Paris postcodes": (
        PARIS,
        "SELECT count(*) FROM profiles p WHERE starts_with(p.traits->>'$.postcode', '75')",
    ),
    "born in the 80s, accept texts": (
        {
            "all": [
                {
                    "field": "traits.birth_date",
                    "op": "between",
                    "value": ["1980-01-01", "1989-12-31"],
                },
                {"field": "traits.sms_opt_in", "op": "eq", "value": "true"},
            ]
        },
        "SELECT count(*) FROM profiles WHERE TRY_CAST(traits->>'$.birth_date' AS TIMESTAMP)"
        " BETWEEN '1980-01-01' AND '1989-12-31' AND traits->>'$.sms_opt_in' = 'true'",
    ),
    "spent 500 in a year": (
        BIG,
        "SELECT count(*) FROM profile_attributes WHERE spend_365d >= 500",
    ),
    "lapsed buyers (180 days)": (
        {"field": "attributes.days_since_last_purchase", "op": "gt", "value": 180},
        "SELECT count(*) FROM profile_attributes WHERE days_since_last_purchase > 180",
    ),
    "bought in 90 days": (
        {"field": "attributes.last_purchase_at", "op": "in_last_days", "value": 90},
        "SELECT count(*) FROM profile_attributes WHERE last_purchase_at BETWEEN $cut90 AND $now",
    ),
    "birthday this week": (
        {"field": "traits.birth_date", "op": "birthday_in_next_days", "value": 7},
        "SELECT count(*) FROM (SELECT TRY_CAST(traits->>'$.birth_date' AS DATE) AS b"
        " FROM profiles) WHERE list_contains($codes, month(b) * 100 + day(b))",
    ),
    "two beauty orders in a year": (
        {
            "event": "Order Completed",
            "where": [{"property": "products[].category", "op": "eq", "value": "beauty"}],
            "count": {"op": "at_least", "value": 2},
            "last_days": 365,
        },
        f"""
        WITH f AS (SELECT event_id FROM events WHERE event = 'Order Completed'
                   AND timestamp BETWEEN $cut365 AND $now
                   AND list_contains(json_extract_string(properties, '$.products[*].category'),
                                     'beauty')),
        ep AS ({EP_FOR})
        SELECT count(*) FROM (SELECT profile_id FROM ep GROUP BY profile_id HAVING count(*) >= 2)
        """,  # noqa: S608 - constant SQL
    ),
    "buyers without a product view in 60 days": (
        {
            "all": [
                {"field": "attributes.orders_count", "op": "gte", "value": 1},
                {"event": "Product Viewed", "performed": False, "last_days": 60},
            ]
        },
        f"""
        WITH f AS (SELECT event_id FROM events WHERE event = 'Product Viewed'
                   AND timestamp BETWEEN $cut60 AND $now),
        ep AS ({EP_FOR})
        SELECT count(*) FROM profile_attributes a
        WHERE a.orders_count >= 1 AND a.profile_id NOT IN (SELECT profile_id FROM ep)
        """,  # noqa: S608 - constant SQL
    ),
    "bought in five stores in 2025": (
        {
            "event": "Order Completed",
            "where": [{"property": "store_id", "op": "in", "value": PARAMS["stores"]}],
            "since": "2025-01-01",
            "until": "2026-01-01",
        },
        f"""
        WITH f AS (SELECT event_id FROM events WHERE event = 'Order Completed'
                   AND timestamp >= $since AND timestamp < $until
                   AND list_contains($stores, properties->>'$.store_id')),
        ep AS ({EP_FOR})
        SELECT count(DISTINCT profile_id) FROM ep
        """,  # noqa: S608 - constant SQL
    ),
    "Parisians but not big spenders (segment refs)": (
        {"all": [{"segment": "@paris"}, {"segment": "@big", "member": False}]},
        "SELECT count(*) FROM profiles p LEFT JOIN profile_attributes a USING (profile_id)"
        " WHERE starts_with(p.traits->>'$.postcode', '75')"
        " AND NOT coalesce(a.spend_365d >= 500, FALSE)",
    ),
}


def _prepared(scale: int, workdir: Path) -> sample_warehouse.Prepared:
    """The prepared stores (reused from CDP_BENCH_PREPARED, or built here), copied to workdir."""
    given = os.environ.get("CDP_BENCH_PREPARED")
    if given:
        folder = Path(given).resolve()
        sample = json.loads((folder / sample_warehouse.READY).read_text())["sample"]
        ready = sample_warehouse._load_ready(Path(sample), folder)
        if ready is None:
            raise SystemExit(f"{given} is not a folder prepared by benchmarks.sample_warehouse")
        source = ready
    else:
        sample = workdir / "sample"
        sample_data.generate(customers=scale, seed=42, out=sample)
        source = sample_warehouse.ensure(sample, workdir / "prepared")
    return source.copy_to(workdir / "stores")


def _attributes(
    result: Result, db: Database, warehouse: Warehouse, settings: SegmentsSettings
) -> None:
    project: list[float] = []
    reference: list[float] = []
    rounds = _rounds()
    for _ in range(rounds):
        with db.begin() as session:
            t0 = time.perf_counter()
            service.refresh_attributes(session, warehouse, settings=settings, now=NOW)
            project.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        warehouse.execute(REFERENCE_ATTRIBUTES)
        reference.append(time.perf_counter() - t0)
    result.add(
        Measure(
            f"refresh of 11 built-in attributes (median of {rounds})",
            "s",
            statistics.median(project),
            statistics.median(reference),
            "hand-written DuckDB query, same columns",
        )
    )
    result.details["attributes_project_s"] = [round(x, 2) for x in project]
    result.details["attributes_reference_s"] = [round(x, 2) for x in reference]
    result.details["attributes_same_values"] = same_attributes(warehouse)
    warehouse.execute(Query("DROP TABLE bench_reference_attributes"))


def _segments(
    result: Result, db: Database, warehouse: Warehouse, settings: SegmentsSettings
) -> None:
    with db.begin() as session:
        ids = {
            key: service.create_segment(
                session,
                warehouse,
                name=f"bench {key}",
                description=None,
                rule=rule,
                refresh_minutes=None,
                settings=settings,
                actor=None,
            ).id
            for key, rule in (("paris", PARIS), ("big", BIG))
        }
    time_cases(
        result,
        db=db,
        warehouse=warehouse,
        settings=settings,
        cases={name: (resolve_refs(raw, ids), hand) for name, (raw, hand) in CASES.items()},
        params=PARAMS,
        now=NOW,
        rounds=_rounds(),
    )


INCREMENTAL_RULE: dict[str, Any] = {  # Any: JSON
    "all": [
        {"field": "traits.postcode", "op": "starts_with", "value": "75"},
        {
            "event": "Order Completed",
            "where": [{"property": "products[].category", "op": "eq", "value": "beauty"}],
            "count": {"op": "at_least", "value": 2},
        },
    ]
}
NEW_ORDERS = 1000

# New orders: copies of the first orders of the sample with new ids, and their identifiers.
ADD_ORDERS = Query(
    """
    CREATE OR REPLACE TEMP TABLE bench_new AS
    SELECT event_id AS old_id,
           (SELECT max(event_id) FROM events) + row_number() OVER (ORDER BY event_id) AS new_id
    FROM events WHERE event = 'Order Completed' ORDER BY event_id LIMIT $n;
    INSERT INTO events
    SELECT b.new_id, 'bench-' || e.message_id, e.source_id, e.batch_id, e.type, e.event,
           e.user_id, e.anonymous_id, e.timestamp, e.received_at, e.properties, e.traits,
           e.context
    FROM events e JOIN bench_new b ON b.old_id = e.event_id;
    INSERT INTO event_identifiers
    SELECT b.new_id, i.kind, i.value FROM event_identifiers i JOIN bench_new b
        ON b.old_id = i.event_id;
    DROP TABLE bench_new
    """,
    {"n": NEW_ORDERS},
)


def _incremental(
    result: Result,
    db: Database,
    warehouse: Warehouse,
    app_settings: Settings,
) -> None:
    """A per-profile segment refreshed in full, then incrementally after new orders."""
    settings = app_settings.segments
    with db.begin() as session:
        segment_id = service.create_segment(
            session,
            warehouse,
            name="bench incremental",
            description=None,
            rule=INCREMENTAL_RULE,
            refresh_minutes=None,
            settings=settings,
            actor=None,
        ).id
        rules = identity_service.get_rules(session)

    def refresh(full: bool) -> tuple[float, service.SegmentRefresh]:
        t0 = time.perf_counter()
        with db.begin() as session:
            done = service.refresh_segment(
                session, warehouse, segment_id=segment_id, settings=settings, now=NOW, full=full
            )
        return time.perf_counter() - t0, done

    first_s, first = refresh(False)
    with warehouse.transaction() as cur:
        for statement in ADD_ORDERS.sql.split(";\n"):
            cur.execute(statement, {"n": NEW_ORDERS} if "$n" in statement else None)
    t0 = time.perf_counter()
    identity_service.resolve(warehouse, settings=app_settings, rules=rules)
    result.details["identity_incremental_s (1,000 new orders)"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    service.refresh_event_map(warehouse)
    result.details["event_map_after_identity_s"] = round(time.perf_counter() - t0, 2)
    # The property values are not refreshed yet: the new orders' filters read their JSON.
    inc_s, inc = refresh(False)
    full_s, full = refresh(True)
    t0 = time.perf_counter()
    service.refresh_property_values(warehouse, settings=settings)
    result.details["property_values_after_orders_s"] = round(time.perf_counter() - t0, 2)
    result.add(
        Measure(
            f"segment refresh after {NEW_ORDERS:,} new orders, incremental"
            f" ({inc.evaluated:,} profiles evaluated)",
            "s",
            inc_s,
            full_s,
            "full refresh of the same segment",
        )
    )
    result.details["incremental"] = {
        "first_refresh": {"mode": first.mode, "seconds": round(first_s, 3), "size": first.size},
        "incremental": {
            "mode": inc.mode,
            "size": inc.size,
            "entries": inc.entries,
            "exits": inc.exits,
        },
        "full_after": {"mode": full.mode, "size": full.size, "entries": full.entries},
        "same_members": inc.size == full.size and full.entries == 0 and full.exits == 0,
    }


def run(scale: int, workdir: Path) -> Result:
    """Prepare (or reuse) the sample stores, then time attributes and segments both ways."""
    prepared = _prepared(scale, workdir)
    result = Result("segments_sample", prepared.customers)
    result.details["events"] = prepared.events
    result.details["profiles"] = prepared.profiles
    app_settings = prepared.settings(memory_limit=os.environ.get("CDP_BENCH_MEMORY", "4GB"))
    settings = app_settings.segments
    db = Database.from_settings(app_settings)
    warehouse = Warehouse(
        app_settings.warehouse_file, memory_limit=app_settings.duckdb_memory_limit
    ).open()
    try:
        _attributes(result, db, warehouse, settings)
        for step, call in (
            ("event_map_s", lambda: service.refresh_event_map(warehouse)),
            ("catalog_first_build_s", lambda: service.refresh_catalog(warehouse)),
            # No new event since: the traits are re-read, the event catalogue is kept.
            ("catalog_again_s", lambda: service.refresh_catalog(warehouse)),
            (
                "property_values_first_build_s",
                lambda: service.refresh_property_values(warehouse, settings=settings),
            ),
        ):
            t0 = time.perf_counter()
            call()
            result.details[step] = round(time.perf_counter() - t0, 2)
        result.details["property_values_rows"] = warehouse.scalar(
            Query("SELECT count(*) FROM segment_property_values")
        )
        for step, call in (
            # No new event since: nothing to add.
            (
                "property_values_again_s",
                lambda: service.refresh_property_values(warehouse, settings=settings),
            ),
        ):
            t0 = time.perf_counter()
            call()
            result.details[step] = round(time.perf_counter() - t0, 2)
        _segments(result, db, warehouse, settings)
        _incremental(result, db, warehouse, app_settings)
    finally:
        warehouse.close()
        db.dispose()
    return result
