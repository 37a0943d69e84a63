"""Data health dashboard: request to last chart data served, vs the raw DuckDB queries.

Seeds a warehouse with `scale` synthetic events (about 1.7 identifiers each, one load batch
per source and hour), starts the real app in-process, and times the page plus every widget's
KPI request, as the browser makes them. The reference runs the same numbers as plain DuckDB
SQL (one GROUP BY per widget) on the same file in the same run.
"""

from __future__ import annotations

import re
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from benchmarks.core import Measure, Result
from cdp.warehouse import Warehouse

SOURCES = ("web", "app", "pos", "crm")
SOURCE_WEIGHTS = (0.45, 0.3, 0.2, 0.05)
CHANNELS = {"web": "http", "app": "http", "pos": "file", "crm": "database"}
TYPES = ("track", "page", "identify")
TYPE_WEIGHTS = (0.7, 0.2, 0.1)


def synthetic_events(
    n: int, *, days: int, end: date, seed: int = 7
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Events, their identifiers and load batches over `days` days ending `end` (vectorised)."""
    rng = np.random.default_rng(seed)
    first = datetime.combine(end - timedelta(days=days - 1), datetime.min.time())
    seconds = np.sort(rng.integers(0, days * 86_400, n))
    source_idx = rng.choice(len(SOURCES), n, p=SOURCE_WEIGHTS)
    type_idx = rng.choice(len(TYPES), n, p=TYPE_WEIGHTS)
    customer = rng.integers(0, max(n // 8, 1), n)
    events = pl.DataFrame(
        {
            "event_id": np.arange(1, n + 1, dtype=np.int64),
            "seconds": seconds,
            "source_id": np.array(SOURCES)[source_idx],
            "type": np.array(TYPES)[type_idx],
            "customer": customer,
        }
    ).with_columns(
        received_at=pl.lit(first) + pl.duration(seconds=pl.col("seconds")),
        hour_bucket=pl.col("seconds") // 3600,
    )
    batches = (
        events.group_by("source_id", "hour_bucket")
        .agg(
            pl.col("event_id").min().alias("first_event_id"),
            pl.col("event_id").max().alias("last_event_id"),
            pl.len().cast(pl.Int64).alias("events"),
            pl.col("received_at").max().alias("committed_at"),
        )
        .sort("first_event_id")
        .with_columns(
            pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("batch_id"),
            pl.col("source_id").replace_strict(CHANNELS).alias("channel"),
        )
    )
    events = events.join(
        batches.select("source_id", "hour_bucket", "batch_id"), on=["source_id", "hour_bucket"]
    ).sort("event_id")
    event_table = events.select(
        "event_id",
        pl.format("m-{}", pl.col("event_id")).alias("message_id"),
        "source_id",
        "batch_id",
        "type",
        pl.when(pl.col("type") == "track").then(pl.lit("Order Completed")).alias("event"),
        pl.when(pl.col("customer") % 3 != 0)
        .then(pl.format("u{}", pl.col("customer")))
        .alias("user_id"),
        pl.format("a{}", pl.col("customer")).alias("anonymous_id"),
        pl.col("received_at").alias("timestamp"),
        "received_at",
        pl.lit(None, dtype=pl.String).alias("properties"),
        pl.lit(None, dtype=pl.String).alias("traits"),
        pl.lit(None, dtype=pl.String).alias("context"),
    )
    anonymous = event_table.select(
        "event_id", pl.lit("anonymous_id").alias("kind"), pl.col("anonymous_id").alias("value")
    )
    users = event_table.filter(pl.col("user_id").is_not_null()).select(
        "event_id", pl.lit("user_id").alias("kind"), pl.col("user_id").alias("value")
    )
    emails = events.filter(pl.col("type") == "identify").select(
        "event_id",
        pl.lit("email").alias("kind"),
        pl.format("c{}@example.com", pl.col("customer")).alias("value"),
    )
    identifiers = pl.concat([anonymous, users, emails]).sort("event_id")
    batch_table = batches.select(
        "batch_id",
        "source_id",
        "channel",
        "first_event_id",
        "last_event_id",
        "events",
        "committed_at",
    )
    return event_table, identifiers, batch_table


def seed_warehouse(
    warehouse: Warehouse, n: int, *, days: int = 60, end: date | None = None, seed: int = 7
) -> None:
    """Load synthetic events, identifiers and batches into a warehouse through Arrow."""
    end = end or datetime.now(UTC).date()
    events, identifiers, batches = synthetic_events(n, days=days, end=end, seed=seed)
    with warehouse.transaction() as cur:
        for statement, frame in (
            ("INSERT INTO events SELECT * FROM staged_rows", events),
            ("INSERT INTO event_identifiers SELECT * FROM staged_rows", identifiers),
            ("INSERT INTO ingest_batches SELECT * FROM staged_rows", batches),
        ):
            cur.register("staged_rows", frame.to_arrow())
            try:
                cur.execute(statement)
            finally:
                cur.unregister("staged_rows")


REFERENCE_SQL = {
    "events_received": "SELECT count(*) FROM events WHERE received_at >= $s AND received_at < $e",
    "events_by_source": (
        "SELECT CAST(received_at AS DATE) d, source_id, count(*) FROM events "
        "WHERE received_at >= $s AND received_at < $e GROUP BY ALL"
    ),
    "events_by_type": (
        "SELECT date_trunc('week', received_at) w, type, count(*) FROM events "
        "WHERE received_at >= $s AND received_at < $e GROUP BY ALL"
    ),
    "identifiers": (
        "SELECT CAST(e.received_at AS DATE) d, i.kind, count(*) FROM event_identifiers i "
        "JOIN events e ON e.event_id = i.event_id "
        "WHERE e.received_at >= $s AND e.received_at < $e GROUP BY ALL"
    ),
    "batches": (
        "SELECT CAST(committed_at AS DATE) d, channel, count(*) FROM ingest_batches "
        "WHERE committed_at >= $s AND committed_at < $e GROUP BY ALL"
    ),
}


def run(scale: int, workdir: Path) -> Result:
    """Time the Data health dashboard over `scale` events against raw DuckDB queries."""
    from fastapi.testclient import TestClient

    from cdp.app import create_app
    from cdp.auth import Role, create_key
    from cdp.config import Settings
    from cdp.db import Base, Database

    result = Result(benchmark="dashboards", scale=scale)
    settings = Settings(
        data_dir=workdir,
        database_url=f"sqlite:///{workdir / 'cdp.sqlite3'}",
        warehouse_path=workdir / "warehouse.duckdb",
        log_json=False,
        scheduler={"enabled": False},
    )
    end = datetime.now(UTC).date()
    warehouse = Warehouse(settings.warehouse_file, memory_limit="2GB").open()
    started = time.perf_counter()
    seed_warehouse(warehouse, scale, days=90, end=end)
    warehouse.close()
    result.details["seed_seconds"] = round(time.perf_counter() - started, 3)
    db = Database(settings.db_url)
    Base.metadata.create_all(db.engine)
    with db.begin() as session:
        _, key = create_key(session, name="bench", role=Role.viewer)
    start = end - timedelta(days=29)
    rounds = 5
    app = create_app(settings, db=db, start_scheduler=False)
    page_times: list[float] = []
    with TestClient(app, base_url="https://testserver") as client:
        signed = client.post("/dashboards/sign-in", data={"api_key": key}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            page = client.get(f"/dashboards/data-health?from={start}&to={end}")
            assert page.status_code == 200
            urls = re.findall(r'"dataUrl": "([^"]+)"', page.text)
            for url in urls:
                assert client.get(url.replace("\\u0026", "&")).status_code == 200
            page_times.append(time.perf_counter() - t0)
        widgets = len(urls)
    project = statistics.median(page_times[1:])

    con = duckdb.connect(str(settings.warehouse_file), read_only=True)
    params = {
        "s": datetime.combine(start, datetime.min.time()),
        "e": datetime.combine(end + timedelta(days=1), datetime.min.time()),
    }
    ref_times: list[float] = []
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        for sql in REFERENCE_SQL.values():
            con.sql(sql, params=params).fetchall()
        ref_times.append(time.perf_counter() - t0)
    con.close()
    reference = statistics.median(ref_times[1:])
    result.add(
        Measure(
            name="data health dashboard, request to last chart data",
            unit="s",
            project=project,
            reference=reference,
            reference_name=f"{len(REFERENCE_SQL)} raw DuckDB GROUP BY queries",
        )
    )
    result.details["widgets"] = widgets
    result.details["range_days"] = 30
    result.details["rounds"] = rounds
    return result
