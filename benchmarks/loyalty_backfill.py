"""Loyalty backfill: the engine over an order history vs hand-written set-based SQL.

A synthetic history (`scale` customers, about 5 orders each over a year, 1-3 products per
order) is loaded into a DuckDB warehouse. A programme with 6 earning rules (1 point per
euro, shoes counted twice, first purchase bonus, big basket bonus, in-store bonus, half a
point per euro capped at 30 a day) is backfilled into a SQLite operational store. The
reference computes the same points with one DuckDB SQL statement. The figures: the engine's
evaluation alone (read from the warehouse, rules in Polars), the whole backfill (with
enrolment and the ledger, lots and activity written), and whether both give the same points.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from sqlalchemy import Select, select

from benchmarks.core import Measure, Result, timer
from cdp.config import Settings
from cdp.db import Base, Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules
from loyalty import engine, service
from loyalty.models import LedgerEntry, Rule
from loyalty.schemas import ProgramCreate, RuleCreate
from migrations.models import load_all_models

RULES: list[dict[str, Any]] = [  # Any: rule JSON
    {"name": "base", "formula": {"type": "per_amount", "rate": 1}},
    {
        "name": "shoes",
        "formula": {
            "type": "per_line",
            "default_multiplier": 0,
            "lines": [{"match": {"category": ["shoes"]}, "multiplier": 1}],
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
        "condition": {"field": "properties.channel", "value": "store"},
    },
    {"name": "half", "formula": {"type": "per_amount", "rate": 0.5}, "cap_per_day": 30},
]

REFERENCE_SQL = """
WITH ev AS (
    SELECT event_id, message_id, coalesce(user_id, anonymous_id) AS profile_id, timestamp,
           coalesce(TRY_CAST(json_extract_string(properties, '$.total') AS DOUBLE), 0) AS total,
           json_extract_string(properties, '$.channel') AS channel,
           properties
    FROM events WHERE event = 'Order Completed'
),
lines AS (
    SELECT message_id, unnest(from_json(json_extract(properties, '$.products'),
           '[{"category": "VARCHAR", "price": "DOUBLE", "quantity": "DOUBLE"}]')) AS l
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
    SELECT message_id, 'shoes', CAST(floor(round(sum(CASE WHEN l.category = 'shoes'
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
    SELECT message_id, 'store', 5 FROM ev WHERE channel = 'store'
    UNION ALL
    SELECT message_id, 'half', greatest(0, least(raw, 30 - (sum(raw) OVER (
        PARTITION BY profile_id, CAST(timestamp AS DATE)
        ORDER BY timestamp, event_id ROWS UNBOUNDED PRECEDING) - raw)))
    FROM half
)
SELECT message_id, rule, CAST(points AS BIGINT) AS points FROM awards WHERE points > 0
"""


def history(customers: int, seed: int = 7) -> pl.DataFrame:
    """A synthetic order history in the warehouse `events` layout."""
    rng = np.random.default_rng(seed)
    per_customer = rng.poisson(4, customers) + 1
    n = int(per_customer.sum())
    profile = np.repeat(np.arange(customers), per_customer)
    start = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1_000_000)
    stamps = start + rng.integers(0, 365 * 86_400 * 1_000_000, n)
    n_lines = rng.integers(1, 4, n)
    lines = pl.DataFrame(
        {
            "order": np.repeat(np.arange(n), n_lines),
            "category": rng.choice(["shoes", "hats", "tees", "bags"], int(n_lines.sum())),
            "price": np.round(rng.uniform(3, 90, int(n_lines.sum())), 2),
            "quantity": rng.integers(1, 4, int(n_lines.sum())).astype(np.float64),
        }
    )
    products = lines.group_by("order").agg(
        pl.struct("category", "price", "quantity").alias("products"),
        (pl.col("price") * pl.col("quantity")).sum().round(2).alias("total"),
    )
    orders = (
        pl.DataFrame(
            {
                "order": np.arange(n),
                "profile": profile,
                "ts": stamps,
                "channel": rng.choice(["web", "store", "app"], n),
            }
        )
        .join(products, on="order")
        .sort("ts", "order")
        .with_row_index("event_id", offset=1)
    )
    return orders.select(
        pl.col("event_id").cast(pl.Int64),
        pl.format("m{}", pl.col("event_id")).alias("message_id"),
        pl.lit("shop").alias("source_id"),
        pl.lit(1, dtype=pl.Int64).alias("batch_id"),
        pl.lit("track").alias("type"),
        pl.lit("Order Completed").alias("event"),
        pl.format("c{}", pl.col("profile")).alias("user_id"),
        pl.lit(None, dtype=pl.String).alias("anonymous_id"),
        pl.from_epoch("ts", time_unit="us").alias("timestamp"),
        pl.from_epoch("ts", time_unit="us").alias("received_at"),
        pl.struct(
            pl.format("o{}", pl.col("event_id")).alias("order_id"),
            "total",
            "channel",
            "products",
        )
        .struct.json_encode()
        .alias("properties"),
        pl.lit(None, dtype=pl.String).alias("traits"),
        pl.lit(None, dtype=pl.String).alias("context"),
    )


def load(warehouse: Warehouse, frame: pl.DataFrame) -> None:
    """Bulk-load events and their user ids into the warehouse through Arrow, then resolve."""
    with warehouse.cursor() as cur:
        cur.register("incoming", frame.to_arrow())
        cur.execute(
            "INSERT INTO events SELECT event_id, message_id, source_id, batch_id, type, event,"
            " user_id, anonymous_id, timestamp, received_at, properties::JSON, traits::JSON,"
            " context::JSON FROM incoming"
        )
        cur.unregister("incoming")
        identifiers = frame.select(
            "event_id", pl.lit("user_id").alias("kind"), pl.col("user_id").alias("value")
        )
        cur.register("incoming_ids", identifiers.to_arrow())
        cur.execute("INSERT INTO event_identifiers SELECT * FROM incoming_ids")
        cur.unregister("incoming_ids")
    # Loyalty reads the profiles identity resolved (one per customer id here), not timed.
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())


def run(scale: int, workdir: Path) -> Result:
    """Backfill `scale` customers' history and compare with the reference SQL."""
    load_all_models()
    result = Result(benchmark="loyalty_backfill", scale=scale)
    workdir.mkdir(parents=True, exist_ok=True)
    warehouse = Warehouse(workdir / "warehouse.duckdb", memory_limit="2GB").open()
    db = Database(f"sqlite:///{workdir / 'operational.sqlite3'}")
    try:
        Base.metadata.create_all(db.engine)
        events = history(scale)
        load(warehouse, events)
        with db.begin() as session:
            program = service.create_program(
                session,
                data=ProgramCreate(name="bench", status="active", enrolment="automatic"),
            )
            program_id = program.id
            for rule in RULES:
                service.create_rule(
                    session,
                    program_id=program_id,
                    data=RuleCreate(**{"event_name": "Order Completed", **rule}),
                )
        with timer() as reference_time:
            reference = warehouse.run(Query(REFERENCE_SQL))
        with timer() as backfill_time, db.begin() as session:
            processed, _ = service.backfill(session, warehouse, program_id=program_id)
        with db.begin() as session:
            stored = service.get_program(session, program_id=program_id)
            with timer() as evaluate_time:
                frame = service.read_events(
                    warehouse,
                    after_event_id=0,
                    up_to_event_id=events.height,
                    names=["Order Completed"],
                )
                joined, specs, _ = engine.member_events(
                    session, program=stored, events=frame, enrol=False
                )
                awards = engine.evaluate(joined, specs, engine.Priors(), stored.timezone)
            rows = session.execute(_ledger_query(program_id)).all()
        ledger = pl.DataFrame(
            rows,
            schema={"message_id": pl.String, "rule": pl.String, "points": pl.Int64},
            orient="row",
        )
        key = ["message_id", "rule"]
        identical = ledger.sort(key).equals(reference.sort(key).cast({"points": pl.Int64}))
        result.add(
            Measure(
                "rule evaluation (read + Polars engine)",
                "s",
                evaluate_time(),
                reference_time(),
                "hand-written DuckDB SQL",
            )
        )
        result.add(
            Measure(
                "whole backfill (enrolment + ledger, lots, activity written to SQLite)",
                "s",
                backfill_time(),
                reference_time(),
                "hand-written DuckDB SQL",
            )
        )
        result.details.update(
            {
                "events": events.height,
                "ledger entries": processed.credits,
                "engine awards": awards.height,
                "reference awards": reference.height,
                "ledgers identical": identical,
                "backfill events/s": round(events.height / max(backfill_time(), 1e-9)),
            }
        )
        if not identical:
            raise AssertionError("the backfill's ledger differs from the reference SQL")
    finally:
        warehouse.close()
        db.dispose()
    return result


def _ledger_query(program_id: str) -> Select[str | None, str, int]:
    return (
        select(LedgerEntry.message_id, Rule.name, LedgerEntry.points)
        .join(Rule, Rule.id == LedgerEntry.rule_id)
        .where(LedgerEntry.program_id == program_id, LedgerEntry.kind == "earn")
    )
