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
import pyarrow as pa

from cdp.warehouse import Warehouse
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
        offered = _counts(events["source_id"])
        rejected = _counts(data.rejections["source_id"])
        sources = sorted(set(offered) | set(rejected) | set(data.dropped))
        if not sources:
            return {}
        with self._lock:
            first_id = self._init_counters()
            now = datetime.now(UTC).replace(tzinfo=None)
            load_sources = pa.table(
                {
                    "source_id": pa.array(sources, pa.string()),
                    "batch_id": pa.array(
                        range(self._next_batch_id, self._next_batch_id + len(sources)),
                        pa.int64(),
                    ),
                    "offered": pa.array([offered.get(s, 0) for s in sources], pa.int64()),
                    "rejected": pa.array([rejected.get(s, 0) for s in sources], pa.int64()),
                    "dropped": pa.array([data.dropped.get(s, 0) for s in sources], pa.int64()),
                    "first_event_id": pa.array([first_id] * len(sources), pa.int64()),
                    "channel": pa.array([data.channel] * len(sources), pa.string()),
                    "import_id": pa.array([data.import_id] * len(sources), pa.string()),
                    "committed_at": pa.array([now] * len(sources), pa.timestamp("us")),
                }
            )
            script = queries.load_script(rejections=data.rejections.height > 0)
            with self.warehouse.transaction() as cur:
                cur.register(queries.INCOMING, events.to_arrow())
                cur.register(queries.INCOMING_IDENTIFIERS, data.identifiers.to_arrow())
                cur.register(queries.LOAD_SOURCES, load_sources)
                if data.rejections.height:
                    cur.register(queries.NEW_REJECTIONS, data.rejections.to_arrow())
                rows = cur.execute(script.sql).fetchall()
            batches = {
                r[1]: LoadedBatch(
                    batch_id=int(r[0]),
                    source_id=r[1],
                    accepted=int(r[2]),
                    duplicates=int(r[3]),
                    rejected=int(r[4]),
                    first_event_id=r[5],
                    last_event_id=r[6],
                )
                for r in rows
            }
            self._next_event_id = first_id + sum(b.accepted for b in batches.values())
            self._next_batch_id += len(sources)
        return batches


def _counts(values: pl.Series) -> dict[str, int]:
    """Rows per value (the sources of a load: usually one)."""
    if not values.len():
        return {}
    first = values[0]
    if values.n_unique() == 1:
        return {first: values.len()}
    return {str(k): int(n) for k, n in values.value_counts().iter_rows()}


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
