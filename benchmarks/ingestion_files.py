"""File import: the file connector loading a Parquet file of N events, against DuckDB's own
`CREATE TABLE AS SELECT * FROM read_parquet(...)` of the same file, measured in the same run.

The data is synthetic till transactions (loyalty card, email, amount, store, timestamp),
so the benchmark does not depend on the sample-data generator.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from benchmarks.core import Measure, Result, timer
from cdp import migrate
from cdp.db import Database
from cdp.warehouse import Warehouse
from ingestion import service
from ingestion.schemas import Mapping

MAPPING = Mapping.model_validate(
    {
        "event": "Purchase",
        "timestamp": "ts",
        "message_id": "transaction_id",
        "identifiers": [
            {"kind": "loyalty_card", "column": "card"},
            {"kind": "email", "column": "email"},
        ],
        "properties": ["amount", "store"],
    }
)


def write_events(path: Path, n: int, *, seed: int = 7) -> None:
    """A Parquet file of `n` synthetic purchase events."""
    rng = np.random.default_rng(seed)
    customers = max(n // 20, 1)
    who = rng.integers(0, customers, n)
    start = int(datetime(2026, 1, 1).timestamp() * 1_000_000)
    frame = pl.DataFrame(
        {
            "transaction_id": pl.int_range(0, n, eager=True).cast(pl.String),
            "card": pl.Series(who).cast(pl.String).str.zfill(8),
            "email": pl.Series(who).cast(pl.String) + "@Example.com",
            "amount": rng.gamma(2.0, 20.0, n).round(2),
            "store": rng.integers(1, 200, n),
            "ts": pl.Series(start + rng.integers(0, 300 * 86_400_000_000, n)).cast(
                pl.Datetime("us")
            ),
        }
    )
    frame.write_parquet(path, row_group_size=500_000)


def run(scale: int, workdir: Path) -> Result:
    """Import `scale` events from Parquet; the reference is DuckDB's CTAS of the same file."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "events.parquet"
    write_events(path, scale)
    result = Result("ingestion_files", scale)

    reference_db = workdir / "reference.duckdb"
    con = duckdb.connect(str(reference_db))
    with timer() as reference_s:
        con.execute("CREATE TABLE events AS SELECT * FROM read_parquet($p)", {"p": str(path)})
    con.close()

    url = f"sqlite:///{workdir / 'cdp.sqlite3'}"
    migrate.upgrade(url)
    db = Database(url)
    warehouse = Warehouse(workdir / "warehouse.duckdb", holder="benchmark").open()
    try:
        with db.begin() as session:
            source, _ = service.create_source(session, name="tills", kind="file", mapping=MAPPING)
            source_id = source.id
        with timer() as project_s:
            run_record = service.import_file(
                db, warehouse, source_id=source_id, path=path, region="FR"
            )
        assert run_record.accepted == scale, run_record
    finally:
        warehouse.close()
        db.dispose()

    result.add(
        Measure(
            "import time",
            "s",
            project_s(),
            reference=reference_s(),
            reference_name="DuckDB CREATE TABLE AS SELECT * FROM read_parquet",
        )
    )
    result.add(
        Measure(
            "events per second",
            "events/s",
            scale / project_s(),
            reference=scale / reference_s(),
            reference_name="DuckDB CTAS rows/s",
            higher_is_better=True,
        )
    )
    result.details["identifiers per event"] = 2
    result.details["file MiB"] = round(path.stat().st_size / 2**20, 1)
    return result
