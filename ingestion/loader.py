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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from cdp.registry import PerObject
from cdp.warehouse import ROW_GROUP_ROWS, Cursor, Warehouse
from ingestion import queries
from ingestion.dedupe import KeyFilter, Keys, Mask

logger = logging.getLogger(__name__)

TS = pl.Datetime("us")
Rows = np.ndarray[Any, np.dtype[np.int64]]  # Any: numpy's shape parameter
# The key filter is kept up to this many stored message keys (400 MB of memory).
KEY_FILTER_MAX_KEYS = 50_000_000
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
    # The spool's sequence number up to which this load takes the spooled records: the
    # mark is stored in the load's transaction, so a replay never loads a record twice.
    spool_lsn: int | None = None
    # The events' message keys, when computed ahead of the load (`with_message_keys`: an
    # import's reader thread does it while the previous chunk loads); else the load does.
    keys: MessageKeys | None = None


@dataclass(frozen=True, slots=True)
class MessageKeys:
    """The message key (md5 of source and message id) of each event, in `_row` order, as
    two 64-bit halves."""

    rows: Rows
    highs: Keys
    lows: Keys


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
        # Upper halves of the stored message keys; filled on the first load (see dedupe.py).
        self._keys: KeyFilter | None = None
        # Beyond this many stored keys the filter is not kept (8 bytes a key in memory): every
        # load is then anti-joined against the whole dedupe table, as without a filter.
        self.max_filter_keys = KEY_FILTER_MAX_KEYS

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
            if data.spool_lsn is not None:
                with self._lock, self.warehouse.transaction() as cur:
                    _set_spool_mark(cur, data.spool_lsn)
            return {}
        with self._lock:
            first_id = self._init_counters()
            now = datetime.now(UTC).replace(tzinfo=None)
            with self.warehouse.transaction() as cur:
                keys = data.keys if data.keys is not None else _message_keys(cur, events)
                kept, kept_high, kept_low = _new_rows(cur, keys, self._key_filter(cur))
                new_events, new_identifiers = _numbered(data, kept, first_id)
                stored = _stored(new_events, offered, first_id)
                load_sources = pa.table(
                    {
                        "source_id": pa.array(sources, pa.string()),
                        "batch_id": pa.array(
                            range(self._next_batch_id, self._next_batch_id + len(sources)),
                            pa.int64(),
                        ),
                        "events": [stored.get(s, (0, None, None))[0] for s in sources],
                        "first_event_id": pa.array(
                            [stored.get(s, (0, None, None))[1] for s in sources], pa.int64()
                        ),
                        "last_event_id": pa.array(
                            [stored.get(s, (0, None, None))[2] for s in sources], pa.int64()
                        ),
                        "received": [offered.get(s, 0) + rejected.get(s, 0) for s in sources],
                        "duplicates": [
                            offered.get(s, 0) - stored.get(s, (0, None, None))[0] for s in sources
                        ],
                        "rejected": [rejected.get(s, 0) for s in sources],
                        "dropped": [data.dropped.get(s, 0) for s in sources],
                        "channel": [data.channel] * len(sources),
                        "import_id": pa.array([data.import_id] * len(sources), pa.string()),
                        "committed_at": pa.array([now] * len(sources), pa.timestamp("us")),
                    }
                )
                cur.register(queries.LOAD_SOURCES, load_sources)
                if new_events.height:
                    cur.register(queries.NEW_EVENTS, batched(new_events, json=JSON_COLUMNS))
                    cur.register(queries.NEW_IDENTIFIERS, batched(new_identifiers))
                    cur.register(
                        queries.NEW_KEYS,
                        pa.table(
                            {
                                "key_high": pa.array(kept_high, pa.uint64()),
                                "key_low": pa.array(kept_low, pa.uint64()),
                            }
                        ),
                    )
                if data.rejections.height:
                    cur.register(queries.NEW_REJECTIONS, data.rejections.to_arrow())
                script = queries.append_load(
                    events=new_events.height > 0,
                    segment_fields=_has_segment_fields(new_events),
                    rejections=data.rejections.height > 0,
                )
                cur.execute(script.sql)
                if data.spool_lsn is not None:
                    _set_spool_mark(cur, data.spool_lsn)
            # Only once committed: the filter must never hold a key the table does not.
            if self._keys is not None:
                self._keys.add(kept_high)
            self._next_event_id = first_id + new_events.height
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
            for row in load_sources.to_pylist()
        }

    def _key_filter(self, cur: Cursor) -> KeyFilter | None:
        """The key filter, (re)built from the dedupe table unless it counts as many keys;
        None once the table holds more than `max_filter_keys`."""
        stored = int(cur.execute(queries.stored_keys_count().sql).fetchall()[0][0])
        if stored > self.max_filter_keys:
            if self._keys is not None:
                logger.info(
                    "%d message keys stored, more than %d: dedupe without the key filter",
                    stored,
                    self.max_filter_keys,
                )
                self._keys = None
            return None
        if self._keys is None or self._keys.count != stored:
            if self._keys is not None:
                logger.warning(
                    "message key filter out of step (%d keys, the table holds %d): rebuilt",
                    self._keys.count,
                    stored,
                )
            highs = cur.sql(queries.stored_key_highs().sql).to_arrow_table().column(0)
            self._keys = KeyFilter.of(highs.to_numpy().astype(np.uint64, copy=False))
        return self._keys

    def checkpoint(self) -> None:
        """Checkpoint the warehouse between two loads; skipped (logged) if DuckDB refuses,
        for example while another connection's transaction is open."""
        with self._lock:
            try:
                self.warehouse.execute(queries.checkpoint())
            except Exception as exc:  # DuckDB's errors: the next checkpoint will do
                if type(exc).__module__.split(".")[0] not in ("duckdb", "_duckdb"):
                    raise
                logger.warning("checkpoint skipped: %s", exc)

    def spool_mark(self) -> int:
        """The highest spool sequence number whose load committed."""
        return int(self.warehouse.scalar(queries.spool_mark()))


def _set_spool_mark(cur: Cursor, lsn: int) -> None:
    query = queries.set_spool_mark(lsn)
    cur.execute(query.sql, query.params)


def concat_loads(loads: list[LoadInput], *, spool_lsn: int | None = None) -> LoadInput:
    """One load from several (same channel): rows renumbered, counters summed."""
    if len(loads) == 1 and spool_lsn is None:
        return loads[0]
    events: list[pl.DataFrame] = []
    identifiers: list[pl.DataFrame] = []
    dropped: dict[str, int] = {}
    offset = 0
    for load in loads:
        if offset:
            events.append(load.events.with_columns(pl.col("_row") + offset))
            identifiers.append(load.identifiers.with_columns(pl.col("_row") + offset))
        else:
            events.append(load.events)
            identifiers.append(load.identifiers)
        offset += load.events.height
        for source, count in load.dropped.items():
            dropped[source] = dropped.get(source, 0) + count
    return LoadInput(
        channel=loads[0].channel,
        events=pl.concat(events, rechunk=True),
        identifiers=pl.concat(identifiers, rechunk=True),
        rejections=pl.concat([load.rejections for load in loads], rechunk=True),
        dropped=dropped,
        import_id=loads[0].import_id,
        spool_lsn=spool_lsn,
    )


# Rows per Arrow record batch handed to DuckDB: its scans of a registered table run one
# thread per batch, so a single 500k-row batch would insert on one core.
ARROW_BATCH_ROWS = ROW_GROUP_ROWS


# The events' JSON columns. Their text is always a serialiser's output (orjson on the HTTP
# path, Polars' `json_encode` or DuckDB's JSON reader on the file and database paths), so
# the loader hands them to DuckDB as Arrow's JSON extension type: DuckDB then stores them as
# they are instead of parsing every document again to validate it (a third of the till
# import's append, a tenth of the web export's).
JSON_COLUMNS = ("properties", "traits", "context")


def batched(frame: pl.DataFrame, *, json: tuple[str, ...] = ()) -> pa.Table:
    """A frame as an Arrow table of several record batches, for parallel scans; the `json`
    columns (text known to be valid JSON) typed as Arrow's JSON extension.

    Strings stay Arrow string views, as Polars holds them (DuckDB scans them as fast as
    plain strings): the conversion to the older layout copied every string.
    """
    table = frame.to_arrow(compat_level=pl.CompatLevel.newest())
    for name in json:
        at = table.schema.get_field_index(name)
        text = table.column(at)
        typed = pa.json_(text.type)
        table = table.set_column(
            at,
            pa.field(name, typed),
            pa.chunked_array(
                [pa.ExtensionArray.from_storage(typed, chunk) for chunk in text.chunks], typed
            ),
        )
    if frame.height <= ARROW_BATCH_ROWS:
        return table
    return pa.Table.from_batches(table.to_batches(max_chunksize=ARROW_BATCH_ROWS))


def with_message_keys(warehouse: Warehouse, data: LoadInput) -> LoadInput:
    """`data` with its events' message keys computed (on a cursor of its own, so a thread
    can prepare the next load while the loader commits the current one)."""
    if data.keys is None:
        with warehouse.cursor() as cur:
            data.keys = _message_keys(cur, data.events)
    return data


def _message_keys(cur: Cursor, events: pl.DataFrame) -> MessageKeys:
    """The message keys of the events (md5 by DuckDB), sorted by `_row`."""
    if not events.height:
        empty = np.empty(0, dtype=np.uint64)
        return MessageKeys(np.empty(0, dtype=np.int64), empty, empty)
    cur.register(queries.INCOMING, batched(events.select("_row", "source_id", "message_id")))
    try:
        table = cur.sql(queries.message_keys().sql).to_arrow_table()
    finally:
        cur.unregister(queries.INCOMING)
    rows: Rows = table.column("_row").to_numpy().astype(np.int64, copy=False)
    highs: Keys = table.column("key_high").to_numpy().astype(np.uint64, copy=False)
    lows: Keys = table.column("key_low").to_numpy().astype(np.uint64, copy=False)
    if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
        order = np.argsort(rows, kind="stable")
        rows, highs, lows = rows[order], highs[order], lows[order]
    return MessageKeys(rows, highs, lows)


def _new_rows(cur: Cursor, keys: MessageKeys, known: KeyFilter | None) -> tuple[Rows, Keys, Keys]:
    """The sorted `_row` of the incoming events whose (source, message id) is new, with the
    two halves of their message keys.

    Within the load the first row of a message wins. Against what is stored, rows the key
    filter clears are new; the others (duplicates, mostly) are checked by the exact anti-join
    (every row, without a filter).
    """
    rows, highs, lows = keys.rows, keys.highs, keys.lows
    if not len(rows):
        return rows, highs, lows
    first = _first_of_each_key(rows, highs, lows)
    if first is not None:
        rows, highs, lows = rows[first], highs[first], lows[first]
    maybe = known.may_contain(highs) if known is not None else np.ones(len(rows), np.bool_)
    if not maybe.any():
        return rows, highs, lows
    candidates = pa.table(
        {
            "_row": pa.array(rows[maybe], pa.int64()),
            "key_high": pa.array(highs[maybe], pa.uint64()),
            "key_low": pa.array(lows[maybe], pa.uint64()),
        }
    )
    cur.register(queries.CANDIDATES, candidates)
    try:
        fresh = cur.sql(queries.new_candidates().sql).to_arrow_table()
    finally:
        cur.unregister(queries.CANDIDATES)
    keep = ~maybe
    keep[maybe] = np.isin(rows[maybe], fresh.column("_row").to_numpy())
    return rows[keep], highs[keep], lows[keep]


def _first_of_each_key(rows: Rows, highs: Keys, lows: Keys) -> Mask | None:
    """Which rows (sorted) are the first of their key, or None when no key repeats."""
    ordered = np.sort(highs)
    if not (ordered[1:] == ordered[:-1]).any():
        return None  # distinct upper halves: distinct keys
    order = np.lexsort((rows, lows, highs))
    high, low = highs[order], lows[order]
    starts = np.ones(len(order), dtype=np.bool_)
    starts[1:] = (high[1:] != high[:-1]) | (low[1:] != low[:-1])
    first = np.zeros(len(order), dtype=np.bool_)
    first[order[starts]] = True
    return first


def _numbered(data: LoadInput, kept: Rows, first_id: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The kept events and their identifiers with event ids, in row order from `first_id`."""
    events = data.events
    if len(kept) < events.height:
        events = events.filter(pl.col("_row").is_in(pl.Series(kept).implode()))
    ids = np.arange(first_id, first_id + len(kept), dtype=np.int64)
    new_events = events.with_columns(event_id=pl.Series(ids))
    identifiers = data.identifiers
    rows = identifiers["_row"].to_numpy()
    # kept is sorted: each identifier's event is found by binary search, no hash join.
    at = np.searchsorted(kept, rows)
    found = at < len(kept)
    found[found] = kept[at[found]] == rows[found]
    new_identifiers = pl.DataFrame(
        {
            "event_id": ids[at[found]],
            "kind": identifiers["kind"].filter(pl.Series(found)),
            "value": identifiers["value"].filter(pl.Series(found)),
        }
    )
    return new_events, new_identifiers


def _stored(
    new_events: pl.DataFrame, offered: dict[str, int], first_id: int
) -> dict[str, tuple[int, int | None, int | None]]:
    """Per source: events stored, first and last event id."""
    if not new_events.height:
        return {}
    if len(offered) == 1:
        # One source (every file import and most drains): its ids are the load's, which
        # are numbered without gaps from `first_id`; no group-by over the events.
        (source,) = offered
        return {source: (new_events.height, first_id, first_id + new_events.height - 1)}
    return {
        str(r[0]): (int(r[1]), int(r[2]), int(r[3]))
        for r in new_events.group_by("source_id")
        .agg(pl.len(), first=pl.col("event_id").min(), last=pl.col("event_id").max())
        .iter_rows()
    }


def _has_segment_fields(events: pl.DataFrame) -> bool:
    """Whether any event carries a Segment-only field (file rows never do)."""
    return any(
        events[name].null_count() < events.height
        for name in ("sent_at", "original_timestamp", "previous_id", "group_id")
    )


def _counts(values: pl.Series) -> dict[str, int]:
    """Rows per value (the sources of a load: usually one)."""
    if not values.len():
        return {}
    if values.n_unique() == 1:
        return {str(values[0]): values.len()}
    return {str(k): int(n) for k, n in values.value_counts().iter_rows()}


# The one loader of a warehouse in this process, shared by every ingestion path.
loader_for: PerObject[Warehouse, Loader] = PerObject(Loader)


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
