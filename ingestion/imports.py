"""The import driver: read a connector chunk by chunk, transform, load, record progress.

Each chunk is one load (one DuckDB transaction), so a long import never holds the loader
for long and the tracking API keeps committing between chunks. The import record in the
operational store is updated after every chunk, in its own short transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from typing import cast

import polars as pl

from cdp.db import Database, utcnow
from cdp.warehouse import Warehouse
from ingestion.connectors import Connector
from ingestion.errors import ImportInterrupted
from ingestion.loader import LoadInput, loader_for, with_message_keys
from ingestion.models import ImportRun

logger = logging.getLogger(__name__)

Transform = Callable[[pl.DataFrame], LoadInput]
# Rows between two checkpoints of the warehouse during an import (0: never). DuckDB
# writes large appends straight to the database file, so the WAL stays small and never
# reaches `checkpoint_threshold`; everything appended since the last checkpoint is then
# checkpointed at once, at the next `CHECKPOINT` or when the warehouse closes (about 1 GB
# more RSS after the 14.9M lines of the 1M sample's web export, see docs/ingestion.md).
CHECKPOINT_ROWS = 2_000_000
Progress = Callable[[int, int | None], None]
# Called after each chunk is committed, with the chunk (a database pull saves its cursor).
AfterChunk = Callable[[pl.DataFrame], None]


def run_import(
    db: Database,
    warehouse: Warehouse,
    *,
    import_id: str,
    connector: Connector,
    transform: Transform,
    total_rows: int | Callable[[], int | None] | None = None,
    progress: Progress | None = None,
    after_chunk: AfterChunk | None = None,
    should_stop: Callable[[], bool] | None = None,
    content_hash: Callable[[], str] | None = None,
) -> ImportRun:
    """Load every chunk of `connector`, keeping the import record `import_id` up to date.

    `total_rows` may be a function, asked after each chunk (None while the total is not
    known yet: a thread is counting). `content_hash`, when given, is called once every chunk
    is loaded and its value recorded with the success, in the same transaction.
    `should_stop` is asked before each chunk: a stopping server interrupts a long import
    between two committed chunks (recorded as failed, with what it loaded so far).
    """

    def total() -> int | None:
        return total_rows() if callable(total_rows) else total_rows

    loader = loader_for(warehouse)
    started = time.perf_counter()
    counts = {"rows_read": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "dropped": 0}
    first_batch: int | None = None
    last_batch: int | None = None
    since_checkpoint = 0

    # The reader thread also computes each load's message keys (md5 in DuckDB), work the
    # loader would otherwise do while the reader waits (see docs/ingestion.md).
    def prepare(chunk: pl.DataFrame) -> LoadInput:
        return with_message_keys(warehouse, transform(chunk))

    try:
        for chunk, data in read_ahead(connector, prepare):
            if should_stop is not None and should_stop():
                raise ImportInterrupted(
                    "the server stopped during the import; the rows loaded so far stay"
                    " (upload the file again to load the rest: loaded rows dedupe)"
                )
            batches = loader.load(data)
            counts["rows_read"] += chunk.height
            for batch in batches.values():
                counts["accepted"] += batch.accepted
                counts["duplicates"] += batch.duplicates
                counts["rejected"] += batch.rejected
                first_batch = batch.batch_id if first_batch is None else first_batch
                last_batch = batch.batch_id
            counts["dropped"] += sum(data.dropped.values())
            since_checkpoint += chunk.height
            if CHECKPOINT_ROWS and since_checkpoint >= CHECKPOINT_ROWS:
                loader.checkpoint()
                since_checkpoint = 0
            if after_chunk is not None:
                after_chunk(chunk)
            known = total()
            _record(
                db, import_id, counts, first_batch, last_batch, status="running", rows_total=known
            )
            if progress is not None:
                progress(counts["rows_read"], known)
        digest = content_hash() if content_hash is not None else None
    # Recorded on the import, then re-raised to the caller; BaseException too, so that a
    # panic of a Rust library (pyo3's PanicException) or an interrupt does not leave the
    # import `running` for ever.
    except BaseException as exc:
        _record(
            db,
            import_id,
            counts,
            first_batch,
            last_batch,
            status="failed",
            duration_ms=int((time.perf_counter() - started) * 1000),
            error=f"{type(exc).__name__}: {exc}",
        )
        raise
    run = _record(
        db,
        import_id,
        counts,
        first_batch,
        last_batch,
        status="succeeded",
        duration_ms=int((time.perf_counter() - started) * 1000),
        rows_total=total(),
        content_hash=digest,
    )
    logger.info(
        "import finished",
        extra={"import_id": import_id, **counts, "duration_ms": run.duration_ms},
    )
    return run


_END = object()


def read_ahead(
    connector: Connector, transform: Transform
) -> Generator[tuple[pl.DataFrame, LoadInput], None, None]:
    """Each chunk with its load, read and transformed by a thread one chunk ahead.

    DuckDB's appends run mostly on one core; reading the next chunk (Polars) and applying
    the mapping meanwhile keeps the second core busy. At most two chunks wait in memory
    beside the one being loaded. An error of the reader is raised here, in order.
    """
    handoff: queue.Queue[object] = queue.Queue(maxsize=1)
    done = threading.Event()

    def put(item: object) -> bool:
        while not done.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in connector.chunks():
                if not put((chunk, transform(chunk))):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, which raises it
            put(exc)

    thread = threading.Thread(target=produce, name="cdp-import-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield cast(tuple[pl.DataFrame, LoadInput], item)
    finally:
        done.set()
        thread.join()


def _record(
    db: Database,
    import_id: str,
    counts: dict[str, int],
    first_batch: int | None,
    last_batch: int | None,
    *,
    status: str,
    duration_ms: int | None = None,
    error: str | None = None,
    rows_total: int | None = None,
    content_hash: str | None = None,
) -> ImportRun:
    with db.begin() as session:
        run = session.get(ImportRun, import_id)
        assert run is not None
        if rows_total is not None:
            run.rows_total = rows_total
        if content_hash is not None:
            run.content_hash = content_hash
        run.rows_read = counts["rows_read"]
        run.accepted = counts["accepted"]
        run.rejected = counts["rejected"]
        run.duplicates = counts["duplicates"]
        run.identifiers_dropped = counts["dropped"]
        run.first_batch_id = first_batch
        run.last_batch_id = last_batch
        run.status = status
        if status != "running":
            run.finished_at = utcnow()
            run.duration_ms = duration_ms
            run.error = error
        return run


def now_naive() -> datetime:
    """UTC now without a zone, as warehouse timestamps are stored."""
    return datetime.now(UTC).replace(tzinfo=None)
