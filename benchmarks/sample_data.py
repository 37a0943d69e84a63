"""Sample-data generation: rows written per second, against Polars writing plain numbers.

The project's figure is every row the generator writes (sources and ground truth) divided by
its wall time. The reference, measured in the same run, is the I/O floor: Polars writing the
same number of rows of plain random numeric columns, the NDJSON share as NDJSON and the rest
as Parquet. The ratio says how many times slower than that floor the generator is.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.core import Measure, Result, timer
from cdp.sample_data import FILES, WEB_FILE, generate

logger = logging.getLogger(__name__)

SEED = 42
_CHUNK = 1_000_000


def run(scale: int, workdir: Path) -> Result:
    """Generate `scale` customers and compare the write rate with the plain-number floor."""
    out = workdir / "sample_data"
    with timer() as elapsed:
        summary = generate(customers=scale, seed=SEED, out=out)
    seconds = elapsed()
    rows = {name: _rows(summary, name) for name in FILES}
    total = sum(rows.values())
    reference = _write_floor(workdir / "reference", total - rows[WEB_FILE], rows[WEB_FILE])
    result = Result(benchmark="sample_data", scale=scale)
    result.add(
        Measure(
            name="rows written per second",
            unit="rows/s",
            project=total / seconds,
            reference=total / reference,
            reference_name="Polars writing as many random numeric rows to Parquet + NDJSON",
            higher_is_better=True,
        )
    )
    result.details = {
        "seconds": round(seconds, 3),
        "reference_seconds": round(reference, 3),
        "rows": total,
        "rows_per_file": rows,
        "bytes": sum((out / name).stat().st_size for name in FILES),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def _rows(summary: dict[str, object], name: str) -> int:
    files = summary["files"]
    assert isinstance(files, dict)
    entry = files[name]
    assert isinstance(entry, dict)
    rows = entry["rows"]
    assert isinstance(rows, int)
    return rows


def _numbers(rows: int) -> pl.DataFrame:
    rng = np.random.default_rng(SEED)
    return pl.DataFrame(
        {
            "id": np.arange(rows, dtype=np.int64),
            "ts": rng.integers(1_700_000_000_000, 1_800_000_000_000, rows),
            "value": rng.random(rows),
            "count": rng.integers(0, 100, rows, dtype=np.int32),
        }
    )


def _repeat(chunk: pl.DataFrame, rows: int) -> pl.DataFrame:
    """`rows` rows made of copies of `chunk`, without copying the data."""
    full, rest = divmod(rows, max(chunk.height, 1))
    return pl.concat([chunk] * full + [chunk.head(rest)], rechunk=False)


def _write_floor(folder: Path, parquet_rows: int, ndjson_rows: int) -> float:
    """Seconds Polars takes to write that many rows of random numbers (the data is ready)."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk = _numbers(min(max(parquet_rows, ndjson_rows), _CHUNK))
    parquet, ndjson = _repeat(chunk, parquet_rows), _repeat(chunk, ndjson_rows)
    with timer() as elapsed:
        parquet.write_parquet(folder / "numbers.parquet", compression="zstd")
        ndjson.write_ndjson(folder / "numbers.ndjson")
    seconds = elapsed()
    shutil.rmtree(folder, ignore_errors=True)
    logger.info("reference: %s + %s rows in %.2f s", parquet_rows, ndjson_rows, seconds)
    return seconds
