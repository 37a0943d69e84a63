"""The file connector: CSV, Parquet and NDJSON (Segment-spec lines), read by Polars in
streamed chunks and loaded in bulk; re-importing a file with the same content is a no-op.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import polars as pl
from sqlalchemy import select

from cdp.db import Database, new_id, utcnow
from cdp.warehouse import Warehouse
from ingestion import transform
from ingestion.connectors import ROW
from ingestion.errors import (
    InvalidMapping,
    SourceDisabled,
    SourceNotFound,
    UnsupportedFile,
    WrongSourceKind,
)
from ingestion.imports import now_naive, run_import
from ingestion.loader import LoadInput, md5_hex
from ingestion.models import ImportRun, Source
from ingestion.schemas import Mapping

logger = logging.getLogger(__name__)

FileFormat = Literal["csv", "parquet", "ndjson"]
SUFFIXES: dict[str, FileFormat] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
}
CHUNK_ROWS = 500_000


def file_format(path: Path) -> FileFormat:
    """The format of a file, from its name."""
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(SUFFIXES))
        raise UnsupportedFile(f"{path.name}: unsupported file type (known: {known})") from None


def content_hash(path: Path) -> str:
    """The SHA-256 of a file's content."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class FileConnector:
    """One file, streamed in chunks of rows, each numbered from 1 in `_row`."""

    def __init__(self, path: Path, *, chunk_rows: int = CHUNK_ROWS) -> None:
        self.path = path
        self.name = path.name
        self.format = file_format(path)
        self.chunk_rows = chunk_rows

    def _scan(self) -> pl.LazyFrame:
        path = str(self.path)
        if self.format == "csv":
            return pl.scan_csv(path, infer_schema=False, truncate_ragged_lines=True)
        if self.format == "parquet":
            return pl.scan_parquet(path)
        return pl.scan_ndjson(path, infer_schema_length=None)

    def total_rows(self) -> int | None:
        """Rows in the file when cheap to know (Parquet metadata), else None."""
        if self.format != "parquet":
            return None
        return int(pl.scan_parquet(str(self.path)).select(pl.len()).collect().item())

    def chunks(self) -> Iterator[pl.DataFrame]:
        """The file's rows in chunks."""
        try:
            lazy = (
                self._scan().with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
            )
            yield from lazy.collect_batches(chunk_size=self.chunk_rows)
        except (pl.exceptions.ComputeError, pl.exceptions.SchemaError, OSError) as exc:
            raise UnsupportedFile(f"{self.name}: cannot read the file: {exc}") from exc


def import_file(
    db: Database,
    warehouse: Warehouse,
    *,
    source_id: str,
    path: Path,
    region: str,
    name: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> ImportRun:
    """Import one file into a `file` or `http` source; returns the finished import record."""
    connector = FileConnector(path, chunk_rows=chunk_rows)
    digest = content_hash(path)
    display = name or path.name
    with db.begin() as session:
        source = session.get(Source, source_id)
        if source is None:
            raise SourceNotFound(f"source {source_id} does not exist")
        if source.kind not in ("file", "http"):
            # An http source may backfill from a Segment export: same source, same dedupe.
            raise WrongSourceKind(f"source {source.name} is a {source.kind} source, not file")
        if not source.enabled:
            raise SourceDisabled(f"source {source.name} is disabled")
        mapping = Mapping.model_validate(source.mapping)
        known_columns = source.columns
        previous = session.scalar(
            select(ImportRun).where(
                ImportRun.source_id == source_id,
                ImportRun.content_hash == digest,
                ImportRun.status == "succeeded",
                ImportRun.skipped.is_(False),
            )
        )
        run = ImportRun(
            id=new_id(),
            source_id=source_id,
            channel="file",
            name=display,
            content_hash=digest,
            status="skipped" if previous else "running",
            skipped=previous is not None,
            started_at=utcnow(),
        )
        if previous is not None:
            run.finished_at = utcnow()
            run.duration_ms = 0
            run.error = f"same content as import {previous.id}: nothing to do"
        session.add(run)
        import_id = run.id
    if previous is not None:
        logger.info("file already imported", extra={"source_id": source_id, "file": display})
        return run
    ctx = transform.Context(
        source_id=source_id,
        channel="file",
        region=region,
        received_at=now_naive(),
        import_id=import_id,
        hasher=lambda values: md5_hex(warehouse, values),
    )
    checked = False

    def apply(chunk: pl.DataFrame) -> LoadInput:
        nonlocal checked
        if connector.format == "ndjson":
            return transform.segment(chunk, mapping, ctx)
        if not checked:
            _check_file_columns(db, source_id, mapping, chunk, known_columns, display)
            checked = True
        return transform.mapped(chunk, mapping, ctx)

    return run_import(
        db,
        warehouse,
        import_id=import_id,
        connector=connector,
        transform=apply,
        total_rows=connector.total_rows(),
        progress=progress,
    )


def _check_file_columns(
    db: Database,
    source_id: str,
    mapping: Mapping,
    chunk: pl.DataFrame,
    known: list[str] | None,
    name: str,
) -> None:
    """Refuse a file missing mapped columns; remember the columns of the first file."""
    columns = [c for c in chunk.columns if c != ROW]
    if mapping.timestamp is None:
        raise InvalidMapping("the source's mapping names no timestamp column")
    if mapping.type == "track" and not (mapping.event or mapping.event_column):
        raise InvalidMapping("a track mapping needs `event` or `event_column`")
    if not mapping.identifiers:
        raise InvalidMapping("the source's mapping declares no identifier")
    missing = sorted(c for c in mapping.columns() if c.split(".")[0] not in columns)
    if missing:
        raise InvalidMapping(
            f"{name} lacks mapped columns: {', '.join(missing)}",
            details={"missing": missing, "columns": columns},
        )
    if known is None:
        with db.begin() as session:
            source = session.get(Source, source_id)
            if source is not None and source.columns is None:
                source.columns = columns
