"""Loyalty backfill over the real-shaped sample history vs hand-written set-based SQL.

The sample (`cdp sample-data`: CRM, till and web orders of `scale` customers over two
years) is loaded through the platform's connectors and identity resolves it
(`benchmarks.sample_warehouse`). A programme with 6 earning rules (1 point per euro,
beauty products counted twice, a first-purchase bonus, a big-basket bonus, an in-store
bonus, half a point per euro capped at 30 a day; automatic enrolment, so every buyer is a
member) is evaluated and backfilled; the reference computes the same points with one
DuckDB statement over the same warehouse, events taken to their profiles through identity's
`event_profile_sql()` like the engine's.

Figures: the engine's rule evaluation (read the orders from the warehouse with the properties
the rules use, join members, evaluate the rules and caps in Polars) against the reference,
with the awards compared; then the whole backfill (enrolment, ledger entries, lots, activity
and refund reversals written to SQLite) and its written earn entries compared with the
reference too.

Stores: `CDP_BENCH_PREPARED=DIR` names a folder prepared by `benchmarks.sample_warehouse`
(copied into the work folder, never written); otherwise `CDP_BENCH_SAMPLE=DIR` names a
sample folder to prepare; otherwise a sample of `scale` customers is generated here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import polars as pl
from sqlalchemy import select

from benchmarks.core import Measure, Result, timer
from benchmarks.sample_warehouse import Prepared, ensure
from cdp import migrate
from cdp.db import Database
from cdp.sample_data import generate
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from loyalty import engine, service
from loyalty.models import LedgerEntry, Rule
from loyalty.schemas import ProgramCreate, RuleCreate

RULES: list[dict[str, Any]] = [  # Any: rule JSON
    {"name": "base", "formula": {"type": "per_amount", "rate": 1}},
    {
        "name": "beauty",
        "formula": {
            "type": "per_line",
            "default_multiplier": 0,
            "lines": [{"match": {"category": ["beauty"]}, "multiplier": 1}],
        },
    },
    {"name": "first", "formula": {"type": "fixed", "points": 100}, "limit_per_member": 1},
    {
        "name": "big",
        "formula": {"type": "fixed", "points": 50},
        "condition": {"field": "properties.total", "op": "gte", "value": 100},
    },
    {
        "name": "store",
        "formula": {"type": "fixed", "points": 5},
        "condition": {"field": "properties.store_id", "op": "exists"},
    },
    {"name": "half", "formula": {"type": "per_amount", "rate": 0.5}, "cap_per_day": 30},
]

REFERENCE_SQL = """
WITH ev AS (
    SELECT e.event_id, e.message_id, ep.profile_id, e.timestamp,
           coalesce(TRY_CAST(json_extract_string(e.properties, '$.total') AS DOUBLE), 0) AS total,
           json_extract_string(e.properties, '$.store_id') AS store_id,
           e.properties
    FROM events e JOIN ({relation}) ep USING (event_id)
    WHERE e.event = 'Order Completed' AND e.event_id <= $up_to
),
lines AS (
    SELECT message_id, unnest(from_json(json_extract(properties, '$.products'),
           '[{{"category": "VARCHAR", "price": "DOUBLE", "quantity": "DOUBLE"}}]')) AS l
    FROM ev
),
half AS (
    SELECT message_id, profile_id, timestamp, event_id,
           CAST(floor(round(total * 0.5, 6)) AS BIGINT) AS raw
    FROM ev
),
awards AS (
    SELECT message_id, 'base' AS rule, CAST(floor(round(total, 6)) AS BIGINT) AS points FROM ev
    UNION ALL
    SELECT message_id, 'beauty', CAST(floor(round(sum(CASE WHEN l.category = 'beauty'
           THEN coalesce(l.price, 0) * coalesce(l.quantity, 1) ELSE 0 END), 6)) AS BIGINT)
    FROM lines GROUP BY message_id
    UNION ALL
    SELECT message_id, 'first', 100 FROM (
        SELECT message_id, row_number() OVER (
            PARTITION BY profile_id ORDER BY timestamp, event_id) AS nth
        FROM ev) WHERE nth = 1
    UNION ALL
    SELECT message_id, 'big', 50 FROM ev WHERE total >= 100
    UNION ALL
    SELECT message_id, 'store', 5 FROM ev WHERE store_id IS NOT NULL
    UNION ALL
    SELECT message_id, 'half', greatest(0, least(raw, 30 - (sum(raw) OVER (
        PARTITION BY profile_id, CAST(timestamp AS DATE)
        ORDER BY timestamp, event_id ROWS UNBOUNDED PRECEDING) - raw)))
    FROM half
)
SELECT message_id, rule, CAST(points AS BIGINT) AS points FROM awards WHERE points > 0
"""

KEY = ["message_id", "rule"]


def _stores(scale: int, workdir: Path) -> Prepared:
    """The prepared stores in the work folder (copied, prepared or generated)."""
    prepared = os.environ.get("CDP_BENCH_PREPARED")
    if prepared:
        ready = json.loads((Path(prepared) / "ready.json").read_text())
        return Prepared(**{**ready, "out": Path(prepared)}).copy_to(workdir / "stores")
    sample = os.environ.get("CDP_BENCH_SAMPLE")
    if sample:
        return ensure(Path(sample), workdir / "stores")
    out = workdir / "sample"
    generate(customers=scale, seed=42, out=out)
    return ensure(out, workdir / "stores")


def _programme(db: Database) -> str:
    with db.begin() as session:
        program = service.create_program(
            session,
            data=ProgramCreate(name="bench", status="active", enrolment="automatic"),
        )
        for rule in RULES:
            service.create_rule(
                session,
                program_id=program.id,
                data=RuleCreate(**{"event_name": "Order Completed", **rule}),
            )
        return program.id


def _evaluate(warehouse: Warehouse, specs: list[engine.RuleSpec], up_to: int) -> pl.DataFrame:
    """The engine's awards over the whole history, every buyer a member (automatic
    enrolment at the first order): (message_id, rule, points)."""
    events = service.read_events(
        warehouse,
        after_event_id=0,
        up_to_event_id=up_to,
        names=[engine.ORDER_EVENT, engine.REFUND_EVENT],
        specs=specs,
    ).filter(pl.col("profile_id").is_not_null())
    members = events.group_by("profile_id").agg(pl.col("timestamp").min().alias("enrolled_at"))
    frame = events.join(members, on="profile_id").with_columns(
        pl.col("profile_id").alias("member_id"),
        pl.lit("active").alias("member_status"),
        pl.lit(None, dtype=pl.String).alias("tier_name"),
        pl.lit(None, dtype=pl.Int64).alias("tier_rank"),
        pl.lit(None, dtype=pl.Float64).alias("tier_multiplier"),
        ((pl.col("timestamp") - pl.col("enrolled_at")).dt.total_days()).alias("seniority_days"),
        pl.lit(None, dtype=pl.String).alias("traits"),
    )
    awards = engine.evaluate(frame, specs, engine.Priors(), "UTC")
    names = pl.DataFrame({"rule_id": [s.id for s in specs], "rule": [s.name for s in specs]})
    return awards.join(names, on="rule_id").select("message_id", "rule", "points")


def run(scale: int, workdir: Path) -> Result:
    """Evaluate and backfill the sample history; compare both with the reference SQL."""
    workdir.mkdir(parents=True, exist_ok=True)
    stores = _stores(scale, workdir)
    migrate.upgrade(f"sqlite:///{stores.database_file}")
    db = Database(f"sqlite:///{stores.database_file}")
    warehouse = Warehouse(stores.warehouse_file, memory_limit="4GB").open()
    result = Result(benchmark="loyalty_sample", scale=stores.customers)
    try:
        program_id = _programme(db)
        up_to = identity_service.resolved_up_to(warehouse)
        with db.begin() as session:
            specs = engine.active_rules(session, program_id=program_id)
        sql = REFERENCE_SQL.format(relation=identity_service.event_profile_sql())
        with timer() as reference_time:
            reference = warehouse.run(Query(sql, {"up_to": up_to})).sort(KEY)
        with timer() as evaluate_time:
            awards = _evaluate(warehouse, specs, up_to)
        evaluated_same = awards.sort(KEY).equals(reference)
        result.add(
            Measure(
                "rule evaluation (read + members + Polars engine)",
                "s",
                evaluate_time(),
                reference_time(),
                "hand-written DuckDB SQL",
            )
        )
        result.details.update(
            {
                "events": stores.events,
                "profiles": stores.profiles,
                "order events": int(
                    warehouse.scalar(
                        Query("SELECT count(*) FROM events WHERE event = 'Order Completed'")
                    )
                ),
                "reference awards": reference.height,
                "engine awards": awards.height,
                "evaluation identical": evaluated_same,
            }
        )
        if not evaluated_same:
            raise AssertionError("the engine's awards differ from the reference SQL")
        if os.environ.get("CDP_BENCH_SKIP_BACKFILL"):
            return result
        with timer() as backfill_time, db.begin() as session:
            processed, _ = service.backfill(session, warehouse, program_id=program_id)
        with db.begin() as session:
            rows = session.execute(
                select(LedgerEntry.message_id, Rule.name, LedgerEntry.points)
                .join(Rule, Rule.id == LedgerEntry.rule_id)
                .where(LedgerEntry.program_id == program_id, LedgerEntry.kind == "earn")
            ).all()
        ledger = pl.DataFrame(
            rows,
            schema={"message_id": pl.String, "rule": pl.String, "points": pl.Int64},
            orient="row",
        ).sort(KEY)
        identical = ledger.equals(reference)
        result.add(
            Measure(
                "whole backfill (enrolment + ledger, lots, activity, reversals in SQLite)",
                "s",
                backfill_time(),
                reference_time(),
                "hand-written DuckDB SQL",
            )
        )
        result.details.update(
            {
                "ledger entries written": processed.credits,
                "reversals": processed.reversals,
                "members enrolled": processed.enrolled,
                "ledgers identical": identical,
                "backfill events/s": round(processed.events / max(backfill_time(), 1e-9)),
            }
        )
        if not identical:
            raise AssertionError("the backfill's ledger differs from the reference SQL")
    finally:
        warehouse.close()
        db.dispose()
    return result
