"""The warehouse loader: every path (HTTP, files, databases) commits events through it.

One load is one DuckDB transaction: dedupe against every message ever stored for the
source, assign event ids from the process's monotonic counter, append events, identifiers
and dedupe keys, publish one `ingest_batches` row per source and record rejections. A lock
serialises loads, so event ids are committed in increasing order and `event_id > mark`
never skips an event that commits later.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl

from cdp.warehouse import Cursor, Warehouse
from ingestion import queries

logger = logging.getLogger(__name__)

TS = pl.Datetime("us")
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "_row": pl.Int64(),
    "message_id": pl.String(),
    "source_id": pl.String(),
    "type": pl.String(),
    "event": pl.String(),
    "user_id": pl.String(),
    "anonymous_id": pl.String(),
    "timestamp": TS,
    "received_at": TS,
    "properties": pl.String(),
    "traits": pl.String(),
    "context": pl.String(),
    "sent_at": TS,
    "original_timestamp": TS,
    "previous_id": pl.String(),
    "group_id": pl.String(),
}
IDENTIFIER_SCHEMA: dict[str, pl.DataType] = {
    "_row": pl.Int64(),
    "kind": pl.String(),
    "value": pl.String(),
}
REJECTION_SCHEMA: dict[str, pl.DataType] = {
    "source_id": pl.String(),
    "position": pl.Int64(),
    "message_id": pl.String(),
    "reason": pl.String(),
}


@dataclass(slots=True)
class LoadInput:
    """Everything one load commits; `_row` ties identifiers to their event."""

    channel: str
    events: pl.DataFrame
    identifiers: pl.DataFrame
    rejections: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=REJECTION_SCHEMA))
    # Identifier values dropped as placeholders or invalid, per source.
    dropped: dict[str, int] = field(default_factory=dict)
    # The import these rows come from, so its rejected rows can be listed.
    import_id: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedBatch:
    """The outcome of a load for one source."""

    batch_id: int
    source_id: str
    accepted: int
    duplicates: int
    rejected: int
    first_event_id: int | None
    last_event_id: int | None


class Loader:
    """Commits loads into the warehouse, one at a time."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        self._lock = threading.Lock()
        self._next_event_id: int | None = None
        self._next_batch_id = 0

    def _init_counters(self) -> int:
        if self._next_event_id is None:
            row = self.warehouse.rows(queries.counters())[0]
            self._next_event_id = int(row[0]) + 1
            self._next_batch_id = int(row[1]) + 1
        return self._next_event_id

    def load(self, data: LoadInput) -> dict[str, LoadedBatch]:
        """Commit one load; returns its batch per source (also for sources with no new event)."""
        events = data.events
        sources = sorted(
            set(events["source_id"].unique().to_list())
            | set(data.rejections["source_id"].unique().to_list())
            | set(data.dropped)
        )
        if not sources:
            return {}
        with self._lock:
            first_id = self._init_counters()
            batch_ids = {s: self._next_batch_id + i for i, s in enumerate(sources)}
            now = datetime.now(UTC).replace(tzinfo=None)
            with self.warehouse.transaction() as cur:
                kept = _new_messages(cur, events)
                new_events = (
                    events.join(kept.select("_row"), on="_row", how="semi")
                    .sort("_row")
                    .with_columns(
                        event_id=pl.int_range(first_id, first_id + kept.height, dtype=pl.Int64),
                        batch_id=pl.col("source_id").replace_strict(
                            batch_ids, return_dtype=pl.Int64
                        ),
                    )
                )
                new_identifiers = data.identifiers.join(
                    new_events.select("_row", "event_id"), on="_row", how="inner"
                ).select("event_id", "kind", "value")
                per_source = _per_source(events, new_events, data, batch_ids, now)
                rejections = data.rejections.with_columns(
                    channel=pl.lit(data.channel),
                    import_id=pl.lit(data.import_id, dtype=pl.String),
                    batch_id=pl.col("source_id").replace_strict(batch_ids, return_dtype=pl.Int64),
                    rejected_at=pl.lit(now, dtype=TS),
                )
                cur.register(queries.NEW_EVENTS, new_events.to_arrow())
                cur.register(queries.NEW_IDENTIFIERS, new_identifiers.to_arrow())
                cur.register(queries.NEW_BATCHES, per_source.to_arrow())
                cur.register(queries.NEW_REJECTIONS, rejections.to_arrow())
                for query in (
                    queries.insert_events(),
                    queries.insert_segment_fields(),
                    queries.insert_identifiers(),
                    queries.insert_keys(),
                    queries.insert_batches(),
                    queries.insert_batch_stats(),
                    queries.insert_rejections(),
                ):
                    cur.execute(query.sql)
                for name in (
                    queries.NEW_EVENTS,
                    queries.NEW_IDENTIFIERS,
                    queries.NEW_BATCHES,
                    queries.NEW_REJECTIONS,
                ):
                    cur.unregister(name)
            self._next_event_id = first_id + kept.height
            self._next_batch_id += len(sources)
        return {
            row["source_id"]: LoadedBatch(
                batch_id=row["batch_id"],
                source_id=row["source_id"],
                accepted=row["events"],
                duplicates=row["duplicates"],
                rejected=row["rejected"],
                first_event_id=row["first_event_id"],
                last_event_id=row["last_event_id"],
            )
            for row in per_source.iter_rows(named=True)
        }


def _new_messages(cur: Cursor, events: pl.DataFrame) -> pl.DataFrame:
    """The `_row` of every incoming event not stored before."""
    cur.register(queries.INCOMING, events.select("_row", "source_id", "message_id").to_arrow())
    try:
        kept = pl.from_arrow(cur.sql(queries.new_messages().sql).to_arrow_table())
    finally:
        cur.unregister(queries.INCOMING)
    assert isinstance(kept, pl.DataFrame)
    return kept


def _per_source(
    events: pl.DataFrame,
    new_events: pl.DataFrame,
    data: LoadInput,
    batch_ids: dict[str, int],
    now: datetime,
) -> pl.DataFrame:
    """One `ingest_batches` row per source of the load."""
    offered = events.group_by("source_id").agg(offered=pl.len())
    stored = new_events.group_by("source_id").agg(
        events=pl.len(),
        first_event_id=pl.col("event_id").min(),
        last_event_id=pl.col("event_id").max(),
    )
    rejected = data.rejections.group_by("source_id").agg(rejected=pl.len())
    base = pl.DataFrame(
        {
            "source_id": list(batch_ids),
            "batch_id": list(batch_ids.values()),
            "identifiers_dropped": [data.dropped.get(s, 0) for s in batch_ids],
        },
        schema={
            "source_id": pl.String(),
            "batch_id": pl.Int64(),
            "identifiers_dropped": pl.Int64(),
        },
    )
    return (
        base.join(offered, on="source_id", how="left")
        .join(stored, on="source_id", how="left")
        .join(rejected, on="source_id", how="left")
        .with_columns(
            pl.col("offered", "events", "rejected").fill_null(0).cast(pl.Int64),
            channel=pl.lit(data.channel),
            committed_at=pl.lit(now, dtype=TS),
        )
        .with_columns(
            duplicates=pl.col("offered") - pl.col("events"),
            received=pl.col("offered") + pl.col("rejected"),
        )
        .drop("offered")
    )


_LOADERS: weakref.WeakKeyDictionary[Warehouse, Loader] = weakref.WeakKeyDictionary()
_LOADERS_LOCK = threading.Lock()


def loader_for(warehouse: Warehouse) -> Loader:
    """The one loader of a warehouse in this process, shared by every ingestion path."""
    with _LOADERS_LOCK:
        found = _LOADERS.get(warehouse)
        if found is None:
            found = _LOADERS[warehouse] = Loader(warehouse)
        return found


def md5_hex(warehouse: Warehouse, values: pl.Series) -> pl.Series:
    """The md5 of each string, computed by DuckDB (Polars has no stable content hash)."""
    with warehouse.cursor() as cur:
        cur.register(queries.ROW_KEYS, values.to_frame("k").to_arrow())
        try:
            hashed = pl.from_arrow(cur.sql(queries.row_hashes().sql).to_arrow_table())
        finally:
            cur.unregister(queries.ROW_KEYS)
    assert isinstance(hashed, pl.DataFrame)
    return hashed["h"]


def empty_events() -> pl.DataFrame:
    """An empty frame with the loader's event columns."""
    return pl.DataFrame(schema=EVENT_SCHEMA)


def empty_identifiers() -> pl.DataFrame:
    """An empty frame with the loader's identifier columns."""
    return pl.DataFrame(schema=IDENTIFIER_SCHEMA)
