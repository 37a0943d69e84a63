"""The file connector: CSV, Parquet and NDJSON (Segment-spec lines), read by Polars in
streamed chunks and loaded in bulk; re-importing a file with the same content is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import orjson
import polars as pl
import pyarrow as pa
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from cdp.db import Database, new_id, utcnow
from cdp.warehouse import ROW_GROUP_ROWS, Warehouse
from ingestion import queries, transform
from ingestion.connectors import MALFORMED, ROW
from ingestion.errors import (
    ImportNotFound,
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
# Each chunk is one load: whole DuckDB row groups (a partial one per load cost the 1M sample's
# web import 11 s of checkpoints merging them). About 500k rows.
CHUNK_ROWS = 4 * ROW_GROUP_ROWS
# NDJSON lines are wider (JSON text of three objects per row): half the rows per chunk
# keeps the three chunks alive at once (loading, queued, being read) near the same memory.
NDJSON_CHUNK_ROWS = 2 * ROW_GROUP_ROWS


def file_format(path: Path) -> FileFormat:
    """The format of a file, from its name."""
    try:
        return SUFFIXES[path.suffix.lower()]
    except KeyError:
        known = ", ".join(sorted(SUFFIXES))
        raise UnsupportedFile(f"{path.name}: unsupported file type (known: {known})") from None


class FileConnector:
    """One file, streamed in chunks of rows, each numbered from 1 in `_row`.

    CSV and Parquet are read by Polars. NDJSON (Segment messages) is read by DuckDB with
    an explicit schema (`queries.SEGMENT_COLUMNS`, objects kept as JSON text) on a scratch
    in-memory database: no pass over the whole file to infer a struct schema, and the
    parsing runs on every core. `paths` are the mapping's extra fields (`properties.card`, a bare
    top-level name), added as flat columns named by their path.
    """

    def __init__(
        self,
        path: Path,
        *,
        chunk_rows: int = CHUNK_ROWS,
        paths: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.name = path.name
        self.format = file_format(path)
        self.chunk_rows = chunk_rows
        self.paths = tuple(paths)

    def _scan(self) -> pl.LazyFrame:
        path = str(self.path)
        if self.format == "csv":
            return pl.scan_csv(path, infer_schema=False, truncate_ragged_lines=True)
        return pl.scan_parquet(path)

    def chunks(self) -> Iterator[pl.DataFrame]:
        """The file's rows in chunks."""
        if self.format == "ndjson":
            yield from self._segment_chunks()
            return
        try:
            lazy = (
                self._scan().with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
            )
            yield from lazy.collect_batches(chunk_size=self.chunk_rows)
        except (pl.exceptions.ComputeError, pl.exceptions.SchemaError, OSError) as exc:
            raise UnsupportedFile(f"{self.name}: cannot read the file: {exc}") from exc

    def _segment_columns(self) -> dict[str, str]:
        columns = dict(queries.SEGMENT_COLUMNS)
        for path in self.paths:
            # Other top-level fields as text: a scalar as itself, an object as JSON text
            # (a dotted path is then read from that text below).
            columns.setdefault(path.split(".")[0], "VARCHAR")
        return columns

    def _segment_chunks(self) -> Iterator[pl.DataFrame]:
        query = queries.segment_lines(str(self.path), self._segment_columns())
        read = 0
        chunk_rows = min(self.chunk_rows, NDJSON_CHUNK_ROWS)
        # Read on a scratch in-memory database: a stream held open on the warehouse would
        # hold its transaction for the whole import, and DuckDB would not checkpoint the
        # loads' WAL until the end (gigabytes at once for a large file).
        with _reader() as scratch, scratch.cursor() as cur:
            try:
                reader = cur.sql(query.sql, params=query.params).to_arrow_reader(chunk_rows)
                # The reader hands out DuckDB's smaller batches: gather exactly a chunk.
                pending: list[pa.RecordBatch] = []
                size = 0
                for batch in reader:
                    pending.append(batch)
                    size += batch.num_rows
                    while size >= chunk_rows:
                        table = pa.Table.from_batches(pending)  # slices below: no copies
                        yield self._frame(table.slice(0, chunk_rows).to_batches(), read)
                        read += chunk_rows
                        rest = table.slice(chunk_rows)
                        pending, size = rest.to_batches(), rest.num_rows
                if pending:
                    yield self._frame(pending, read)
                return
            except UnsupportedFile:
                raise
            except Exception as exc:  # DuckDB's read errors (bad JSON, unreadable file)
                # Met while the Arrow reader streams, DuckDB's error comes as pyarrow's OSError.
                if not (_is_read_error(exc) or isinstance(exc, OSError)):
                    raise
                if not any(m in str(exc) for m in ("Malformed JSON", "JSON transform error")):
                    raise UnsupportedFile(f"{self.name}: cannot read the file: {exc}") from exc
                logger.warning(
                    "%s: malformed JSON after record %d; checking the rest line by line",
                    self.name,
                    read,
                )
        # The records already handed out are the first `read` non-blank lines (DuckDB reads
        # in file order and skips blank lines): the rest is read line by line.
        yield from self._checked_chunks(skip=read, chunk_rows=chunk_rows)

    def _checked_chunks(self, *, skip: int, chunk_rows: int) -> Iterator[pl.DataFrame]:
        """The records after the first `skip` non-blank lines, each line checked on its own.

        A line that is not a JSON object becomes a row with only its line number and the
        reason in `MALFORMED` (rejected and counted like any bad row); the good lines of a
        chunk are read by the same query as a clean file, numbered by their line. The slow
        path, taken only for a file with malformed lines.
        """
        good: list[bytes] = []
        numbers: list[int] = []
        bad: list[tuple[int, str]] = []
        seen = 0
        with self.path.open("rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                seen += 1
                if seen <= skip:
                    continue
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    bad.append((number, f"malformed JSON: {exc}"))
                else:
                    if isinstance(value, dict):
                        good.append(line if line.endswith(b"\n") else line + b"\n")
                        numbers.append(number)
                    else:
                        bad.append((number, "malformed JSON: not an object"))
                if len(good) + len(bad) >= chunk_rows:
                    yield self._checked_frame(good, numbers, bad)
                    good, numbers, bad = [], [], []
        if good or bad:
            yield self._checked_frame(good, numbers, bad)

    def _checked_frame(
        self, good: list[bytes], numbers: list[int], bad: list[tuple[int, str]]
    ) -> pl.DataFrame:
        parts: list[pl.DataFrame] = []
        if good:
            with tempfile.TemporaryDirectory(prefix="cdp-ndjson-") as folder:
                lines = Path(folder) / "lines.ndjson"
                lines.write_bytes(b"".join(good))
                query = queries.segment_lines(str(lines), self._segment_columns())
                with _reader() as reader, reader.cursor() as cur:
                    try:
                        table = cur.sql(query.sql, params=query.params).to_arrow_table()
                    except Exception as exc:
                        if not _is_read_error(exc):
                            raise
                        raise UnsupportedFile(f"{self.name}: cannot read the file: {exc}") from exc
            frame = pl.from_arrow(table)
            assert isinstance(frame, pl.DataFrame)
            rows = pl.Series(ROW, numbers, dtype=pl.Int64)
            parts.append(frame.select(rows, pl.all(), *self._extra(frame)))
        if bad:
            parts.append(
                pl.DataFrame(
                    {ROW: [n for n, _ in bad], MALFORMED: [r for _, r in bad]},
                    schema={ROW: pl.Int64, MALFORMED: pl.String},
                )
            )
        return pl.concat(parts, how="diagonal_relaxed").sort(ROW)

    def _frame(self, batches: list[pa.RecordBatch], read: int) -> pl.DataFrame:
        """Record batches as one chunk, rows numbered after the `read` before them."""
        frame = pl.from_arrow(pa.Table.from_batches(batches))
        assert isinstance(frame, pl.DataFrame)
        rows = pl.int_range(read + 1, read + frame.height + 1, dtype=pl.Int64)
        return frame.select(rows.alias(ROW), pl.all(), *self._extra(frame))

    def _extra(self, frame: pl.DataFrame) -> list[pl.Expr]:
        """The mapping's dotted paths not read by the query, from their JSON text."""
        extra: list[pl.Expr] = []
        for path in dict.fromkeys(self.paths):
            head, _, rest = path.partition(".")
            if path in frame.columns or not rest:
                continue
            extra.append(pl.col(head).str.json_path_match(f"$.{rest}").alias(path))
        return extra


# The scratch reader's own memory limit: it streams, holding a few of DuckDB's batches.
READER_MEMORY = "1GB"


def _reader() -> Warehouse:
    """An in-memory DuckDB for reading a file apart from the warehouse."""
    return Warehouse(":memory:", memory_limit=READER_MEMORY)


def _is_read_error(exc: Exception) -> bool:
    """Whether an exception is DuckDB failing to read or parse the file."""
    return type(exc).__module__.split(".")[0] in ("duckdb", "_duckdb")


BLOCK_BYTES = 16 * 1024 * 1024


PROBE_BYTES = 1024 * 1024


def content_probe(path: Path) -> str:
    """SHA-256 of a file's size and of its first and last MiB: two reads, whatever its size.

    Files with the same content have the same probe, so an import whose probe no earlier
    import of the source has is of new content, and needs no full hash before it starts.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}\n".encode())
    with path.open("rb") as handle:
        digest.update(handle.read(PROBE_BYTES))
        if size > PROBE_BYTES:
            handle.seek(max(size - PROBE_BYTES, PROBE_BYTES))
            digest.update(handle.read(PROBE_BYTES))
    return digest.hexdigest()


class _HashCancelled(Exception):
    """The import the hash was for has ended without it."""


def hash_and_count(
    path: Path, file_format: FileFormat, *, cancelled: Callable[[], bool] | None = None
) -> tuple[str, int]:
    """The SHA-256 of a file and its rows, in one read of the file: CSV and NDJSON rows
    counted as lines (an estimate when quoted fields hold line breaks), Parquet's from
    its metadata. `cancelled` is asked before each block (a hash running beside its import).

    A thread hashes each block (hashlib releases the GIL) while this one counts its line
    breaks, so a large text file costs one read and the slower of the two, not both.
    """
    digest = hashlib.sha256()
    lines = 0
    last = b"\n"
    with path.open("rb") as handle, ThreadPoolExecutor(1, "cdp-import-hash") as pool:
        pending: Future[None] | None = None
        while block := handle.read(BLOCK_BYTES):
            if cancelled is not None and cancelled():
                raise _HashCancelled(str(path))
            if pending is not None:
                pending.result()
            pending = pool.submit(digest.update, block)
            if file_format != "parquet":
                lines += block.count(b"\n")
                last = block[-1:]
        if pending is not None:
            pending.result()
    if file_format == "parquet":
        return digest.hexdigest(), int(pl.scan_parquet(str(path)).select(pl.len()).collect().item())
    if last != b"\n":
        lines += 1  # a last line without its newline
    return digest.hexdigest(), max(lines - 1, 0) if file_format == "csv" else lines


def _importable(session: Session, source_id: str) -> Source:
    source = session.get(Source, source_id)
    if source is None:
        raise SourceNotFound(f"source {source_id} does not exist")
    if source.kind not in ("file", "http"):
        # An http source may backfill from a Segment export: same source, same dedupe.
        raise WrongSourceKind(f"source {source.name} is a {source.kind} source, not file")
    if not source.enabled:
        raise SourceDisabled(f"source {source.name} is disabled")
    return source


def queue_import(
    db: Database, *, source_id: str, name: str, file_path: Path | None = None
) -> ImportRun:
    """Check that the source takes files and record an import `queued` for one file."""
    with db.begin() as session:
        _importable(session, source_id)
        run = ImportRun(
            id=new_id(),
            source_id=source_id,
            channel="file",
            name=name,
            status="queued",
            started_at=utcnow(),
            file_path=None if file_path is None else str(file_path),
        )
        session.add(run)
    return run


def run_queued_import(
    db: Database,
    warehouse: Warehouse,
    *,
    import_id: str,
    path: Path,
    region: str,
    progress: Callable[[int, int | None], None] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    should_stop: Callable[[], bool] | None = None,
) -> ImportRun:
    """Run a queued import of `path`; returns its finished record (also when skipped).

    The same content already imported into the source makes it `skipped`. A file whose
    content probe no earlier import of the source has is new: its import starts at once and
    a thread hashes and counts the file meanwhile (the import is CPU-bound, so the 6 GB web
    export of the 1M sample gains 2.4 of the 4.9 s its hash took first). Otherwise the file
    is hashed before anything else, to compare. A failure is recorded on the import (status
    `failed`, the error) and raised.
    """
    digest: str | None = None
    rows_total: int | None = None
    try:
        fmt = file_format(path)
        probe = content_probe(path)
        with db.begin() as session:
            run = _import_run(session, import_id)
            # Earlier imports that may hold this content: the same probe, or none recorded.
            earlier = session.execute(
                select(ImportRun.id, ImportRun.content_hash).where(
                    ImportRun.source_id == run.source_id,
                    ImportRun.status == "succeeded",
                    ImportRun.skipped.is_(False),
                    ImportRun.id != import_id,
                    or_(ImportRun.content_probe == probe, ImportRun.content_probe.is_(None)),
                )
            ).all()
        if earlier:
            digest, rows_total = hash_and_count(path, fmt)
        with db.begin() as session:
            run = _import_run(session, import_id)
            source = _importable(session, run.source_id)
            mapping = Mapping.model_validate(source.mapping)
            known_columns = source.columns
            run.content_probe = probe
            run.content_hash = digest
            source_id, display = run.source_id, run.name
            previous = next((id_ for id_, hash_ in earlier if digest and hash_ == digest), None)
            if previous is not None:
                run.status = "skipped"
                run.skipped = True
                run.finished_at = utcnow()
                run.duration_ms = 0
                run.error = f"same content as import {previous}: nothing to do"
                logger.info(
                    "file already imported", extra={"source_id": source_id, "file": display}
                )
                return run
            connector = FileConnector(path, chunk_rows=chunk_rows, paths=_segment_paths(mapping))
            run.status = "running"
            run.rows_total = rows_total
    except Exception as exc:  # recorded on the import, then raised
        _failed(db, import_id, exc)
        raise
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

    load = functools.partial(
        run_import,
        db,
        warehouse,
        import_id=import_id,
        connector=connector,
        transform=apply,
        progress=progress,
        should_stop=should_stop,
    )
    if digest is not None:
        return load(total_rows=rows_total)
    ended = threading.Event()
    with ThreadPoolExecutor(1, "cdp-import-content") as pool:
        content = pool.submit(hash_and_count, path, fmt, cancelled=ended.is_set)
        try:
            return load(
                total_rows=lambda: content.result()[1] if _succeeded(content) else None,
                content_hash=lambda: content.result()[0],
            )
        finally:
            ended.set()


def _succeeded(future: Future[tuple[str, int]]) -> bool:
    return future.done() and future.exception() is None


def _import_run(session: Session, import_id: str) -> ImportRun:
    run = session.get(ImportRun, import_id)
    if run is None:
        raise ImportNotFound(f"import {import_id} does not exist")
    return run


def _segment_paths(mapping: Mapping) -> list[str]:
    """The fields of a Segment message that the mapping's identifiers read."""
    paths = [spec.column for spec in mapping.identifiers if spec.column is not None]
    for spec in mapping.identifiers:
        paths.extend(spec.composite or [])
    return paths


def _failed(db: Database, import_id: str, exc: Exception) -> None:
    with db.begin() as session:
        run = session.get(ImportRun, import_id)
        if run is not None:
            run.status = "failed"
            run.finished_at = utcnow()
            run.duration_ms = 0
            run.error = f"{type(exc).__name__}: {exc}"


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
    """Import one file into a `file` or `http` source now; returns the finished record."""
    file_format(path)
    run = queue_import(db, source_id=source_id, name=name or path.name)
    return run_queued_import(
        db,
        warehouse,
        import_id=run.id,
        path=path,
        region=region,
        progress=progress,
        chunk_rows=chunk_rows,
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
    nested = {
        c: str(chunk.schema[c])
        for spec in mapping.identifiers
        for c in ([spec.column] if spec.column else list(spec.composite or []))
        if c in chunk.columns and chunk.schema[c].is_nested()
    }
    if nested:
        raise InvalidMapping(
            f"{name}: identifier columns must hold text or numbers, not lists or structs:"
            f" {', '.join(f'{c} ({t})' for c, t in sorted(nested.items()))}",
            details={"columns": nested},
        )
    if known is None:
        with db.begin() as session:
            source = session.get(Source, source_id)
            if source is not None and source.columns is None:
                source.columns = columns
