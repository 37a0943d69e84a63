"""File import: the file connector loading a Parquet file of N events, against DuckDB's own
`CREATE TABLE AS SELECT * FROM read_parquet(...)` of the same file, measured in the same run.

The data is synthetic till transactions (loyalty card, email, amount, store, timestamp),
so the benchmark does not depend on the sample-data generator.

With `CDP_BENCH_SAMPLE=/work/sample-1m` it imports a generated sample data set instead
(`cdp sample-data`): the CRM CSV, the prepared till orders (Parquet, as `cdp demo` writes
them) and the web NDJSON, each with the demo's mapping, against DuckDB's CTAS of the same
file (`read_csv`, `read_parquet`, `read_json`). `CDP_BENCH_SAMPLE_FILES=crm,till` picks
some of them (default all three); `--scale` is then ignored.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from benchmarks.core import Measure, Result, peak_rss_mib, timer
from cdp import migrate
from cdp.db import Database
from cdp.demo import CRM_MAPPING, PREPARED_TILL, TILL_MAPPING, prepare_till
from cdp.sample_data import CRM_FILE, TILL_FILE, WEB_FILE
from cdp.warehouse import Warehouse
from ingestion import service
from ingestion.schemas import Mapping, SourceKind

logger = logging.getLogger(__name__)

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
    sample = os.environ.get("CDP_BENCH_SAMPLE")
    if sample:
        files = os.environ.get("CDP_BENCH_SAMPLE_FILES", "crm,till,web").split(",")
        return run_sample(Path(sample), workdir, [f.strip() for f in files if f.strip()])
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


# name -> (file under the sample dir, DuckDB reader, source kind, mapping)
SAMPLE_FILES: dict[str, tuple[str, str, SourceKind, Mapping | None]] = {
    "crm": (CRM_FILE, "read_csv", "file", CRM_MAPPING),
    "till": (PREPARED_TILL, "read_parquet", "file", TILL_MAPPING),
    "web": (WEB_FILE, "read_json", "http", None),
}
READERS = {
    "read_csv": "CREATE TABLE t AS SELECT * FROM read_csv($p)",
    "read_parquet": "CREATE TABLE t AS SELECT * FROM read_parquet($p)",
    "read_json": "CREATE TABLE t AS SELECT * FROM read_json($p, format = 'newline_delimited')",
}


# The reference gets the warehouse's memory limit (DuckDB's default is 80% of the RAM).
REFERENCE_MEMORY = "4GB"


def _ctas_child(reader: str, path: str, target: str) -> tuple[float, float]:
    """CTAS of one file in a fresh database: (seconds, this process's peak RSS in MiB)."""
    _reset_peak_rss()  # a spawned child starts with its parent's high-water mark
    con = duckdb.connect(target, config={"memory_limit": REFERENCE_MEMORY})
    try:
        con.execute("SET enable_progress_bar = false")  # its output, not part of the work
        started = time.perf_counter()
        con.execute(READERS[reader], {"p": path})
        return time.perf_counter() - started, _peak_rss_since_reset_mib()
    finally:
        con.close()


def _ctas(reader: str, path: Path, workdir: Path) -> tuple[float, float]:
    """DuckDB's CTAS of `path`, run in a child process so that its memory is not counted
    in the import's peak RSS: (seconds, the child's peak RSS in MiB)."""
    target = workdir / "reference.duckdb"
    target.unlink(missing_ok=True)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(_ctas_child, reader, str(path), str(target)).result()
    finally:
        target.unlink(missing_ok=True)
        Path(f"{target}.wal").unlink(missing_ok=True)


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux `clear_refs`), so it can be read per file."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_since_reset_mib() -> float:
    """Peak RSS since the last reset (VmHWM), in MiB; the process's peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mib()


def _prepared_till(sample_dir: Path, workdir: Path) -> Path:
    """The demo's prepared till orders, written under `workdir` (never into the sample)."""
    mirror = workdir / "sample"
    (mirror / TILL_FILE).parent.mkdir(parents=True, exist_ok=True)
    link = mirror / TILL_FILE
    if not link.exists():
        link.symlink_to(sample_dir / TILL_FILE)
    return prepare_till(mirror)


def run_sample(sample_dir: Path, workdir: Path, names: list[str]) -> Result:
    """Import files of a generated sample, each against DuckDB's CTAS of the same file."""
    url = f"sqlite:///{workdir / 'cdp.sqlite3'}"
    migrate.upgrade(url)
    db = Database(url)
    # The server's setting (CDP_DUCKDB_MEMORY_LIMIT, 4GB by default): DuckDB's buffers
    # only, so the process's RSS adds the Polars/Arrow chunks to it.
    memory_limit = os.environ.get("CDP_DUCKDB_MEMORY_LIMIT", "4GB")
    warehouse = Warehouse(
        workdir / "warehouse.duckdb", holder="benchmark", memory_limit=memory_limit
    ).open()
    total_events = 0
    total_project = 0.0
    total_reference = 0.0
    # The peak RSS is reset before each import and before the close (so each is measured
    # alone); the process's peak is the highest of them.
    process_peak = 0.0
    details: dict[str, str] = {}
    try:
        for name in names:
            relative, reader, kind, mapping = SAMPLE_FILES[name]
            path = sample_dir / relative
            if name == "till" and not path.is_file():
                path = _prepared_till(sample_dir, workdir)
            reference, reference_rss = _ctas(reader, path, workdir)
            with db.begin() as session:
                source, _ = service.create_source(session, name=name, kind=kind, mapping=mapping)
                source_id = source.id
            _reset_peak_rss()
            started = time.perf_counter()
            record = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
            seconds = time.perf_counter() - started
            rss = _peak_rss_since_reset_mib()
            process_peak = max(process_peak, rss)
            total_events += record.rows_read
            total_project += seconds
            total_reference += reference
            details[name] = (
                f"{record.rows_read:,} rows, {record.accepted:,} accepted in {seconds:.1f} s"
                f" ({record.rows_read / seconds:,.0f} rows/s) vs CTAS {reference:.1f} s"
                f" ({seconds / reference:.2f}x); peak RSS {rss:,.0f} MiB"
                f" (CTAS process {reference_rss:,.0f} MiB)"
            )
            logger.info("%s: %s", name, details[name])
    finally:
        _reset_peak_rss()
        started = time.perf_counter()
        warehouse.close()
        closing = time.perf_counter() - started
        db.dispose()
    result = Result("ingestion_files (sample)", total_events)
    close_rss = _peak_rss_since_reset_mib()
    result.details["warehouse close"] = (
        f"{closing:.1f} s, peak RSS during the close {close_rss:,.0f} MiB"
    )
    result.details["process peak RSS (imports and close; the `peak RSS` line is the close's)"] = (
        f"{max(process_peak, close_rss):,.0f} MiB"
    )
    result.add(
        Measure(
            "import time, all files",
            "s",
            total_project,
            reference=total_reference,
            reference_name="DuckDB CREATE TABLE AS SELECT * FROM read_<format> of each file",
        )
    )
    result.add(
        Measure(
            "events per second",
            "events/s",
            total_events / total_project,
            reference=total_events / total_reference,
            reference_name="DuckDB CTAS rows/s",
            higher_is_better=True,
        )
    )
    result.details.update(details)
    result.details["total"] = (
        f"{total_events:,} rows in {total_project:.1f} s vs CTAS {total_reference:.1f} s:"
        f" ratio {total_project / total_reference:.2f}x (target at most 2x)"
    )
    result.details["sample"] = str(sample_dir)
    result.details["warehouse memory_limit"] = memory_limit
    return result
