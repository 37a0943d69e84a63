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
reference too. A second reference line adds to the SQL a plain `executemany` of its rows
into a SQLite table with only an integer primary key (the storage floor), to show how much
of the gap is the store; the main ratio stays against the SQL alone.

Stores: `CDP_BENCH_PREPARED=DIR` names a folder prepared by `benchmarks.sample_warehouse`
(copied into the work folder, never written); otherwise `CDP_BENCH_SAMPLE=DIR` names a
sample folder to prepare; otherwise a sample of `scale` customers is generated here.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks.core import Measure, Result, timer
from benchmarks.sample_warehouse import Prepared, ensure
from cdp import migrate
from cdp.db import Database
from cdp.sample_data import generate
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from loyalty import engine, service
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

# The whole ledger the backfill should write, by hand: every award (profile, order, event,
# rule, points) and every refund's reversal (rule 'reverse', the points it takes back,
# whether the balance covers them or not: -points + unrecovered of its entry).
REFERENCE_SQL = """
WITH ev AS (
    SELECT e.event_id, e.message_id, ep.profile_id, e.timestamp,
           json_extract_string(e.properties, '$.order_id') AS order_id,
           coalesce(TRY_CAST(json_extract_string(e.properties, '$.total') AS DOUBLE), 0) AS total,
           json_extract_string(e.properties, '$.store_id') AS store_id,
           coalesce(TRY_CAST(json_extract_string(e.properties, '$.total') AS DOUBLE),
                    TRY_CAST(json_extract_string(e.properties, '$.revenue') AS DOUBLE),
                    0) AS spend,
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
),
earned AS (
    SELECT ev.profile_id, ev.order_id, ev.event_id, ev.message_id, a.rule,
           CAST(a.points AS BIGINT) AS points
    FROM awards a JOIN ev USING (message_id) WHERE a.points > 0
),
refund_events AS (
    SELECT e.event_id, e.message_id, ep.profile_id AS own, e.timestamp,
           coalesce(json_extract_string(e.properties, '$.original_order_id'),
                    json_extract_string(e.properties, '$.original_transaction_id'),
                    json_extract_string(e.properties, '$.order_id')) AS order_id,
           abs(coalesce(TRY_CAST(json_extract_string(e.properties, '$.total') AS DOUBLE),
                        TRY_CAST(json_extract_string(e.properties, '$.revenue') AS DOUBLE)))
               AS amount
    FROM events e JOIN ({relation}) ep USING (event_id)
    WHERE e.event = 'Order Refunded' AND e.event_id <= $up_to
),
-- A refund from a buyer (a member) is that member's; from anyone else, it is the refund of
-- the member whose sale it names, when that sale came before it (time, then event id).
refunds AS (
    SELECT * FROM (
        SELECT r.* EXCLUDE (own),
               CASE WHEN r.own IN (SELECT profile_id FROM ev) THEN r.own ELSE (
                   SELECT s.profile_id FROM ev s
                   WHERE s.order_id = r.order_id
                     AND (s.timestamp < r.timestamp
                          OR (s.timestamp = r.timestamp AND s.event_id < r.event_id))
                   ORDER BY s.timestamp, s.event_id LIMIT 1) END AS profile_id
        FROM refund_events r
    ) WHERE profile_id IS NOT NULL
),
order_points AS (SELECT order_id, sum(points) AS points FROM earned GROUP BY order_id),
spent AS (SELECT order_id, sum(spend) AS spent FROM ev WHERE spend > 0 GROUP BY order_id),
shares AS (
    SELECT r.*, op.points AS earned_points,
           CASE WHEN r.amount IS NULL OR coalesce(s.spent, 0) = 0 THEN 1.0
                ELSE least(1.0, (coalesce(sum(coalesce(r.amount, 0)) OVER earlier, 0)
                                 + r.amount) / s.spent) END AS share
    FROM refunds r JOIN order_points op USING (order_id) LEFT JOIN spent s USING (order_id)
    WINDOW earlier AS (PARTITION BY r.order_id ORDER BY r.timestamp, r.event_id
                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
),
targets AS (
    SELECT *, CAST(round(round(earned_points * share, 6)) AS BIGINT) AS target FROM shares
),
reversals AS (
    SELECT profile_id, order_id, event_id, message_id, 'reverse' AS rule,
           target - greatest(0, coalesce(max(target) OVER (
               PARTITION BY order_id ORDER BY timestamp, event_id
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)) AS points
    FROM targets
)
SELECT profile_id, order_id, event_id, message_id, rule, points FROM earned
UNION ALL
SELECT profile_id, order_id, event_id, message_id, rule, points FROM reversals WHERE points > 0
"""

# The ledger's entries compared with the reference: points per member, order, event and rule.
LEDGER_KEY = ["profile_id", "order_id", "event_id", "rule", "points"]
LEDGER_SQL = """
SELECT m.profile_id, e.order_id, e.event_id, coalesce(r.name, e.kind) AS rule,
       CASE WHEN e.kind = 'reverse' THEN -e.points + e.unrecovered ELSE e.points END AS points
FROM loyalty_ledger_entry e
JOIN loyalty_member m ON m.id = e.member_id
LEFT JOIN loyalty_rule r ON r.id = e.rule_id
WHERE e.program_id = ? AND e.kind IN ('earn', 'reverse')
"""
LEDGER_SCHEMA: dict[str, pl.DataType] = {
    "profile_id": pl.String(),
    "order_id": pl.String(),
    "event_id": pl.Int64(),
    "rule": pl.String(),
    "points": pl.Int64(),
}

KEY = ["message_id", "rule"]


def _stores(scale: int, workdir: Path) -> Prepared:
    """The prepared stores in the work folder (copied, prepared or generated)."""
    prepared = os.environ.get("CDP_BENCH_PREPARED")
    if prepared:
        ready = json.loads((Path(prepared) / "ready.json").read_text())
        return Prepared(**{**ready, "out": Path(prepared)}).copy_to(workdir / "stores")
    sample = os.environ.get("CDP_BENCH_SAMPLE")
    if sample:
        base = ensure(Path(sample), workdir / "prepared")
    else:
        out = workdir / "sample"
        generate(customers=scale, seed=42, out=out)
        base = ensure(out, workdir / "prepared")
    # The backfill writes into the stores: every run starts from a fresh copy, so a reused
    # --workdir measures the same work (its ledger grew by a whole backfill per run before).
    return base.copy_to(workdir / "stores")


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


class PeakRss:
    """The peak resident memory of this process while a block runs (sampled every 50 ms
    from /proc, so a phase's own peak shows even after an earlier, larger one)."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, _rss_mib())
            if self._stop.wait(0.05):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, _rss_mib())


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ledger(db: Database, program_id: str) -> pl.DataFrame:
    """The backfill's earn and reverse entries, as the reference's rows, read in chunks."""
    parts = [pl.DataFrame(schema=LEDGER_SCHEMA)]
    with db.begin() as session:
        cursor = session.connection().exec_driver_sql(LEDGER_SQL, (program_id,))
        while rows := cursor.fetchmany(500_000):
            parts.append(pl.DataFrame(rows, schema=LEDGER_SCHEMA, orient="row"))
    return pl.concat(parts)


def _hashes(frame: pl.DataFrame) -> pl.Series:
    """One 64-bit hash per row of the compared columns, sorted: two multisets of rows are
    compared in 8 bytes a row (the full frames are read again only to explain a difference)."""
    return frame.select(LEDGER_KEY).cast(pl.Schema(LEDGER_SCHEMA)).hash_rows(seed=7).sort()


def _ledger_hashes(db: Database, program_id: str) -> pl.Series:
    """`_hashes` of the backfill's earn and reverse entries, read in chunks."""
    parts = [pl.Series("hash", [], dtype=pl.UInt64)]
    with db.begin() as session:
        cursor = session.connection().exec_driver_sql(LEDGER_SQL, (program_id,))
        while rows := cursor.fetchmany(500_000):
            parts.append(_hashes(pl.DataFrame(rows, schema=LEDGER_SCHEMA, orient="row")))
    return pl.concat(parts).sort()


FLOOR_COLUMNS = ["profile_id", "order_id", "event_id", "message_id", "rule", "points"]


def _write_floor(path: Path, rows: pl.DataFrame) -> None:
    """The storage floor: the reference's rows written in one `executemany` into a SQLite
    table with only its integer primary key (no other index), committed, through the same
    engine settings as the operational store."""
    for leftover in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        leftover.unlink(missing_ok=True)  # a --workdir used before holds the last run's table
    floor = Database(f"sqlite:///{path}")
    try:
        with floor.begin() as session:
            connection = session.connection()
            connection.exec_driver_sql(
                "CREATE TABLE floor_entry (id INTEGER PRIMARY KEY, profile_id TEXT,"
                " order_id TEXT, event_id INTEGER, message_id TEXT, rule TEXT, points INTEGER)"
            )
            connection.exec_driver_sql(
                "INSERT INTO floor_entry (profile_id, order_id, event_id, message_id, rule,"
                " points) VALUES (?, ?, ?, ?, ?, ?)",
                rows.select(FLOOR_COLUMNS).rows(),
            )
    finally:
        floor.dispose()


def _differences(ledger: pl.DataFrame, reference: pl.DataFrame) -> dict[str, object]:
    """What differs between the ledger and the reference, by rule, with a few examples."""
    extra = ledger.join(reference, on=LEDGER_KEY, how="anti", nulls_equal=True)
    missing = reference.join(ledger, on=LEDGER_KEY, how="anti", nulls_equal=True)
    return {
        "ledger rows not in the reference": extra.height,
        "reference rows not in the ledger": missing.height,
        "by rule (ledger only)": dict(extra.group_by("rule").len().iter_rows()),
        "by rule (reference only)": dict(missing.group_by("rule").len().iter_rows()),
        "examples (ledger only)": extra.sort(LEDGER_KEY).head(3).rows(),
        "examples (reference only)": missing.sort(LEDGER_KEY).head(3).rows(),
    }


def run(scale: int, workdir: Path) -> Result:
    """Backfill the sample history and compare its ledger, entry by entry, with the
    reference SQL; optionally (`CDP_BENCH_EVALUATION=1`) time the rule evaluation alone."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Per-slice step times of the backfill on stderr (read, members, priors, rules, ...).
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    for name in ("loyalty.engine", "loyalty.service", "loyalty.ledger"):
        logging.getLogger(name).setLevel(logging.DEBUG)
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
        # The backfill first, so its peak memory is its own (DuckDB keeps the buffers of a
        # large query in the process afterwards).
        with timer() as backfill_time, PeakRss() as backfill_rss, db.begin() as session:
            processed, _ = service.backfill(session, warehouse, program_id=program_id)
        db.dispose()  # SQLite's page cache of the backfill's connection, before the reference
        sql = REFERENCE_SQL.format(relation=identity_service.event_profile_sql())
        with timer() as reference_time, PeakRss() as reference_rss:
            reference = warehouse.run(Query(sql, {"up_to": up_to}))
        # The storage floor beside the reference: the same rows written plainly.
        with timer() as floor_time:
            _write_floor(workdir / "floor.sqlite3", reference)
        result.details.update(
            {
                "events": stores.events,
                "profiles": stores.profiles,
                "order events": int(
                    warehouse.scalar(
                        Query("SELECT count(*) FROM events WHERE event = 'Order Completed'")
                    )
                ),
                "reference awards": int((reference["rule"] != "reverse").sum()),
                "reference reversals": int((reference["rule"] == "reverse").sum()),
                "reference peak RSS MiB": round(reference_rss.peak_mib),
            }
        )
        result.add(
            Measure(
                "whole backfill (read, rules, enrolment, ledger entries, lots, activity,"
                " reversals written to SQLite)",
                "s",
                backfill_time(),
                reference_time(),
                "hand-written DuckDB SQL of the same awards and reversals",
            )
        )
        result.add(
            Measure(
                "whole backfill, against the storage floor",
                "s",
                backfill_time(),
                reference_time() + floor_time(),
                "the same SQL + a plain executemany of its rows into a SQLite table with only"
                " an integer primary key",
            )
        )
        result.details["storage floor write s"] = round(floor_time(), 3)
        found = _ledger_hashes(db, program_id)
        identical = found.equals(_hashes(reference), check_names=False)
        result.details.update(
            {
                "backfill peak RSS MiB": round(backfill_rss.peak_mib),
                "ledger entries written": processed.credits,
                "reversals written": processed.reversals,
                "members enrolled": processed.enrolled,
                "ledger rows compared": found.len(),
                "ledgers identical (entry by entry)": identical,
                "backfill events/s": round(processed.events / max(backfill_time(), 1e-9)),
            }
        )
        if not identical:
            expected = reference.select(LEDGER_KEY)
            result.details.update(_differences(_ledger(db, program_id), expected))
        if os.environ.get("CDP_BENCH_EVALUATION"):
            awards_reference = (
                reference.filter(pl.col("rule") != "reverse").select([*KEY, "points"]).sort(KEY)
            )
            with timer() as evaluate_time, PeakRss() as evaluate_rss:
                awards = _evaluate(warehouse, specs, up_to)
            result.add(
                Measure(
                    "rule evaluation alone, all at once (read + members + Polars engine)",
                    "s",
                    evaluate_time(),
                    reference_time(),
                    "hand-written DuckDB SQL",
                )
            )
            result.details.update(
                {
                    "evaluation identical": awards.sort(KEY).equals(awards_reference),
                    "evaluation peak RSS MiB": round(evaluate_rss.peak_mib),
                }
            )
        if not identical:
            raise AssertionError(
                f"the backfill's ledger differs from the reference: {result.details}"
            )
    finally:
        warehouse.close()
        db.dispose()
    return result
