"""Ten typical segments: compiled rule vs hand-written SQL, and the preview time of each.

The project's figure per segment is compile (catalogue, references) + evaluation of the count
through `segments.service`; the reference is a hand-written DuckDB query of the same count,
run in the same process on the same data. Counts are checked equal. The details also give,
per segment, the compiled statement's own time over the reference's (`statement_only_ratio`).
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks.core import Measure, Result
from benchmarks.segments_data import NOW, load_shop
from cdp.config import SegmentsSettings
from cdp.db import Base, Database
from cdp.warehouse import Query, Warehouse
from migrations.models import load_all_models
from segments import service
from segments.compiler import birthday_codes

ROUNDS = 3
# Cases whose reference runs under FAST_SECONDS are timed FAST_ROUNDS times instead.
FAST_SECONDS = 0.05
FAST_ROUNDS = 15

EP_FOR = """
    SELECT ei.event_id, arg_min(n.profile_id, (n.rank, n.node_id)) AS profile_id
    FROM event_identifiers ei
    SEMI JOIN f ON f.event_id = ei.event_id
    JOIN identity_nodes n ON n.kind = ei.kind AND n.value = ei.value
    WHERE n.profile_id IS NOT NULL
    GROUP BY ei.event_id
"""

PARAMS: dict[str, object] = {
    "now": NOW,
    "cut60": NOW - timedelta(days=60),
    "cut90": NOW - timedelta(days=90),
    "cut365": NOW - timedelta(days=365),
    "codes": birthday_codes(NOW.date(), 7),
}

FRENCH: dict[str, Any] = {"field": "traits.country", "op": "eq", "value": "FR"}  # Any: JSON
BIG: dict[str, Any] = {"field": "attributes.spend_total", "op": "gte", "value": 500}  # Any: JSON

# name -> (rule, hand-written SQL returning the count)
CASES: dict[str, tuple[dict[str, Any], str]] = {  # Any: JSON
    "french": (FRENCH, "SELECT count(*) FROM profiles WHERE traits->>'$.country' = 'FR'"),
    "older germans or spaniards": (
        {
            "all": [
                {"field": "traits.country", "op": "in", "value": ["DE", "ES"]},
                {"field": "traits.age", "op": "gte", "value": 40},
            ]
        },
        "SELECT count(*) FROM profiles WHERE traits->>'$.country' IN ('DE', 'ES')"
        " AND TRY_CAST(traits->>'$.age' AS DOUBLE) >= 40",
    ),
    "big spenders": (BIG, "SELECT count(*) FROM profile_attributes WHERE spend_total >= 500"),
    "bought in 90 days": (
        {"field": "attributes.last_purchase_at", "op": "in_last_days", "value": 90},
        "SELECT count(*) FROM profile_attributes WHERE last_purchase_at BETWEEN $cut90 AND $now",
    ),
    "birthday this week": (
        {"field": "traits.birthday", "op": "birthday_in_next_days", "value": 7},
        "SELECT count(*) FROM (SELECT TRY_CAST(traits->>'$.birthday' AS DATE) AS b FROM profiles)"
        " WHERE list_contains($codes, month(b) * 100 + day(b))",
    ),
    "two shoe orders in a year": (
        {
            "event": "Order Completed",
            "where": [{"property": "category", "op": "eq", "value": "shoes"}],
            "count": {"op": "at_least", "value": 2},
            "last_days": 365,
        },
        f"""
        WITH f AS (SELECT event_id FROM events WHERE event = 'Order Completed'
                   AND timestamp BETWEEN $cut365 AND $now
                   AND properties->>'$.category' = 'shoes'),
        ep AS ({EP_FOR})
        SELECT count(*) FROM (SELECT profile_id FROM ep GROUP BY profile_id HAVING count(*) >= 2)
        """,  # noqa: S608 - constant SQL
    ),
    "buyers without a view in 60 days": (
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
    "frequent vips": (
        {
            "all": [
                {"field": "traits.vip", "op": "eq", "value": True},
                {"field": "attributes.orders_count", "op": "gte", "value": 3},
            ]
        },
        "SELECT count(*) FROM profiles p JOIN profile_attributes a USING (profile_id)"
        " WHERE TRY_CAST(p.traits->>'$.vip' AS BOOLEAN) AND a.orders_count >= 3",
    ),
    "french or frequent visitors": (
        {"any": [FRENCH, {"field": "attributes.visits_365d", "op": "gte", "value": 5}]},
        "SELECT count(*) FROM profiles p JOIN profile_attributes a USING (profile_id)"
        " WHERE p.traits->>'$.country' = 'FR' OR a.visits_365d >= 5",
    ),
    "french but not big spenders (segment refs)": (
        {"all": [{"segment": "@french"}, {"segment": "@big", "member": False}]},
        "SELECT count(*) FROM profiles p JOIN profile_attributes a USING (profile_id)"
        " WHERE p.traits->>'$.country' = 'FR' AND NOT coalesce(a.spend_total >= 500, FALSE)",
    ),
}


def resolve_refs(rule: Any, ids: dict[str, str]) -> Any:  # Any: JSON
    """A rule with its `"segment": "@name"` references replaced by the segments' ids."""
    if isinstance(rule, dict):
        return {
            k: (ids[v[1:]] if k == "segment" else resolve_refs(v, ids)) for k, v in rule.items()
        }
    if isinstance(rule, list):
        return [resolve_refs(r, ids) for r in rule]
    return rule


def time_cases(
    result: Result,
    *,
    db: Database,
    warehouse: Warehouse,
    settings: SegmentsSettings,
    cases: dict[str, tuple[dict[str, Any], str]],  # Any: JSON
    params: dict[str, object],
    now: datetime,
    rounds: int,
) -> None:
    """Time each case (rule, hand-written SQL) both ways, median of `rounds` (FAST_ROUNDS for a
    case whose reference takes under FAST_SECONDS), and its preview.

    Adds a measure per case and the total; details: previews, counts equal, and per case the
    compiled statement's own time over the reference's (`statement_only_ratio`: the SQL
    compared with the SQL, without the compile's fixed cost of a millisecond or two).
    """
    total_project = total_reference = 0.0
    statements: dict[str, float | None] = {}
    previews: dict[str, float] = {}
    mismatched = []
    for name, (rule, hand) in cases.items():
        hand_params = {k: v for k, v in params.items() if f"${k}" in hand}
        project: list[float] = []
        statement: list[float] = []
        reference: list[float] = []
        counts = set()
        got = None
        for done in range(max(rounds, FAST_ROUNDS)):
            # A case of a few milliseconds takes more rounds (both sides alike): three rounds
            # of a 3 ms query measure the machine's jitter more than the query.
            if done >= rounds and statistics.median(reference) >= FAST_SECONDS:
                break
            t0 = time.perf_counter()
            with db.begin() as session:
                query = service.compile_segment_rule(
                    session, warehouse, rule=service.parse_rule(rule), settings=settings, now=now
                )
            count = Query(f"SELECT count(*) FROM ({query.sql})", query.params)  # noqa: S608
            got = warehouse.scalar(count)
            project.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            warehouse.scalar(count)
            statement.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            want = warehouse.scalar(Query(hand, hand_params))
            reference.append(time.perf_counter() - t0)
            counts.add((got, want))
        if any(g != w for g, w in counts):
            mismatched.append((name, sorted(counts)))
        t0 = time.perf_counter()
        with db.begin() as session:
            service.preview(session, warehouse, rule=rule, settings=settings, now=now)
        previews[name] = round(time.perf_counter() - t0, 3)
        p, r = statistics.median(project), statistics.median(reference)
        statements[name] = round(statistics.median(statement) / r, 2) if r else None
        total_project += p
        total_reference += r
        result.add(Measure(f"{name} (count {got})", "s", p, r, "hand-written SQL"))
    result.add(
        Measure("ten segments, total", "s", total_project, total_reference, "hand-written SQL")
    )
    result.details["statement_only_ratio"] = statements
    result.details["preview_seconds"] = previews
    result.details["preview_seconds_max"] = max(previews.values())
    result.details["counts_equal"] = not mismatched
    if mismatched:
        result.details["mismatched"] = mismatched


def run(scale: int, workdir: Path) -> Result:
    """Generate `scale` customers, refresh attributes, then time each segment both ways."""
    load_all_models()
    result = Result("segments_rules", scale)
    warehouse = Warehouse(workdir / "bench.duckdb", memory_limit="3GB").open()
    db = Database(f"sqlite:///{workdir / 'bench.sqlite3'}")
    Base.metadata.create_all(db.engine)
    settings = SegmentsSettings()
    try:
        result.details["events"] = load_shop(warehouse, scale, now=NOW)
        with db.begin() as session:
            service.refresh_attributes(session, warehouse, settings=settings, now=NOW)
            service.refresh_event_map(warehouse)
            service.refresh_catalog(warehouse)
            ids = {
                "french": service.create_segment(
                    session,
                    warehouse,
                    name="french",
                    description=None,
                    rule=FRENCH,
                    refresh_minutes=None,
                    settings=settings,
                    actor=None,
                ).id,
                "big": service.create_segment(
                    session,
                    warehouse,
                    name="big",
                    description=None,
                    rule=BIG,
                    refresh_minutes=None,
                    settings=settings,
                    actor=None,
                ).id,
            }
        time_cases(
            result,
            db=db,
            warehouse=warehouse,
            settings=settings,
            cases={name: (resolve_refs(raw, ids), hand) for name, (raw, hand) in CASES.items()},
            params=PARAMS,
            now=NOW,
            rounds=ROUNDS,
        )
    finally:
        warehouse.close()
        db.dispose()
    return result
