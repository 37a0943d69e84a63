"""DuckDB SQL of the ingestion package."""

from __future__ import annotations

from cdp.warehouse import Query

# Names under which the loader registers its Arrow inputs on its cursor (the SQL below
# spells them out: no SQL here is built from strings).
INCOMING = "ingest_incoming"
CANDIDATES = "ingest_candidates"
NEW_EVENTS = "ingest_new_events"
NEW_IDENTIFIERS = "ingest_new_identifiers"
NEW_KEYS = "ingest_new_keys"
LOAD_SOURCES = "ingest_load_sources"
NEW_REJECTIONS = "ingest_new_rejections"
ROW_KEYS = "ingest_row_keys"


def counters() -> Query:
    """The highest event id and batch id committed so far."""
    return Query(
        "SELECT (SELECT coalesce(max(event_id), 0) FROM events),"
        " (SELECT coalesce(max(batch_id), 0) FROM ingest_batches)"
    )


def message_keys() -> Query:
    """The message key of every incoming row, in two 64-bit halves, with its `_row`."""
    return Query(
        """
        SELECT _row, (k >> 64)::UBIGINT AS key_high,
            (k & 18446744073709551615::UHUGEINT)::UBIGINT AS key_low
        FROM (SELECT _row, md5_number(source_id || chr(0) || message_id) AS k
              FROM ingest_incoming)
        """
    )


def new_candidates() -> Query:
    """Of the rows in `ingest_candidates` (`_row` and key halves: rows the key filter could
    not clear), those whose message key was never stored."""
    return Query(
        """
        SELECT c._row
        FROM ingest_candidates AS c
        ANTI JOIN ingest_message_keys AS k
            ON k.message_key = (c.key_high::UHUGEINT << 64) | c.key_low::UHUGEINT
        """
    )


def stored_keys_count() -> Query:
    """How many message keys the dedupe table holds."""
    return Query("SELECT count(*) FROM ingest_message_keys")


def stored_key_highs() -> Query:
    """The upper 64 bits of every stored message key (to fill the loader's key filter)."""
    return Query("SELECT (message_key >> 64)::UBIGINT AS key_high FROM ingest_message_keys")


# The appends of one load, run as one script inside the loader's transaction (one call
# into DuckDB, so the writer thread gives up and retakes the GIL once, not once per
# statement). Inputs: ingest_new_events (numbered), ingest_new_identifiers (numbered),
# ingest_new_keys (the new events' message keys in halves),
# ingest_load_sources (one row per source with its counters, channel, import and time),
# ingest_new_rejections.
_EVENTS = """
INSERT INTO events (event_id, message_id, source_id, batch_id, type, event, user_id,
    anonymous_id, timestamp, received_at, properties, traits, context)
SELECT e.event_id, e.message_id, e.source_id, s.batch_id, e.type, e.event, e.user_id,
    e.anonymous_id, e.timestamp, e.received_at, e.properties, e.traits, e.context
FROM ingest_new_events AS e JOIN ingest_load_sources AS s ON s.source_id = e.source_id
"""
_KEYS = """
INSERT INTO ingest_message_keys
SELECT (key_high::UHUGEINT << 64) | key_low::UHUGEINT FROM ingest_new_keys
"""
_SEGMENT_FIELDS = """
INSERT INTO event_segment_fields (event_id, sent_at, original_timestamp, previous_id, group_id)
SELECT event_id, sent_at, original_timestamp, previous_id, group_id
FROM ingest_new_events
WHERE sent_at IS NOT NULL OR original_timestamp IS NOT NULL
   OR previous_id IS NOT NULL OR group_id IS NOT NULL
"""
_IDENTIFIERS = """
INSERT INTO event_identifiers (event_id, kind, value)
SELECT event_id, kind, value FROM ingest_new_identifiers
"""
_REJECTIONS = """
INSERT INTO ingest_rejections (source_id, channel, batch_id, import_id, position,
    message_id, reason, rejected_at)
SELECT r.source_id, s.channel, s.batch_id, s.import_id, r.position, r.message_id, r.reason,
    s.committed_at
FROM ingest_new_rejections AS r JOIN ingest_load_sources AS s ON s.source_id = r.source_id
"""
_BATCHES = """
INSERT INTO ingest_batches (batch_id, source_id, channel, first_event_id, last_event_id,
    events, committed_at)
SELECT batch_id, source_id, channel, first_event_id, last_event_id, events, committed_at
FROM ingest_load_sources
"""
_BATCH_STATS = """
INSERT INTO ingest_batch_stats (batch_id, source_id, received, duplicates, rejected,
    identifiers_dropped)
SELECT batch_id, source_id, received, duplicates, rejected, dropped
FROM ingest_load_sources
"""


def append_load(*, events: bool, segment_fields: bool, rejections: bool) -> Query:
    """Append the registered events, identifiers, keys, rejections and batch rows."""
    steps: list[str] = []
    if events:
        steps += [_EVENTS, _KEYS, _IDENTIFIERS]
    if segment_fields:
        steps.append(_SEGMENT_FIELDS)
    if rejections:
        steps.append(_REJECTIONS)
    steps += [_BATCHES, _BATCH_STATS]
    return Query(";\n".join(step.strip() for step in steps))


def checkpoint() -> Query:
    """Write what was appended into the database file's checkpointed storage."""
    return Query("CHECKPOINT")


def spool_mark() -> Query:
    """The highest spool sequence number loaded into the warehouse."""
    return Query("SELECT coalesce(max(drained_lsn), 0) FROM ingest_spool_mark")


def set_spool_mark(lsn: int) -> Query:
    """Record that every spool record up to `lsn` is loaded (inside the load's transaction)."""
    return Query("UPDATE ingest_spool_mark SET drained_lsn = $lsn", {"lsn": lsn})


def high_water_mark() -> Query:
    """The highest event id of a committed load."""
    return Query("SELECT coalesce(max(last_event_id), 0) FROM ingest_batches")


def source_stats(source_id: str) -> Query:
    """Counters of one source over all its loads."""
    return Query(
        """
        SELECT coalesce(sum(s.received), 0) AS received,
               coalesce(sum(b.events), 0) AS accepted,
               coalesce(sum(s.rejected), 0) AS rejected,
               coalesce(sum(s.duplicates), 0) AS duplicates,
               coalesce(sum(s.identifiers_dropped), 0) AS identifiers_dropped,
               max(CASE WHEN b.events > 0 THEN b.committed_at END) AS last_event_at
        FROM ingest_batches AS b JOIN ingest_batch_stats AS s USING (batch_id)
        WHERE b.source_id = $source_id
        """,
        {"source_id": source_id},
    )


def recent_rejections(source_id: str, *, limit: int) -> Query:
    """The latest rejections of one source, newest first."""
    return Query(
        """
        SELECT channel, batch_id, position, message_id, reason, rejected_at
        FROM ingest_rejections WHERE source_id = $source_id
        ORDER BY rejected_at DESC, batch_id DESC, position DESC
        LIMIT $limit
        """,
        {"source_id": source_id, "limit": limit},
    )


def rejections_of_import(import_id: str, *, limit: int) -> Query:
    """The first rejected rows of an import, in file order."""
    return Query(
        "SELECT position, reason FROM ingest_rejections WHERE import_id = $import_id"
        " ORDER BY position LIMIT $limit",
        {"import_id": import_id, "limit": limit},
    )


# The Segment message fields an NDJSON import reads, with the types DuckDB reads them as:
# scalars as text (a number as its digits), objects as JSON text.
SEGMENT_COLUMNS: dict[str, str] = {
    "type": "VARCHAR",
    "event": "VARCHAR",
    "name": "VARCHAR",
    "messageId": "VARCHAR",
    "timestamp": "VARCHAR",
    "sentAt": "VARCHAR",
    "userId": "VARCHAR",
    "anonymousId": "VARCHAR",
    "previousId": "VARCHAR",
    "groupId": "VARCHAR",
    "traits": "JSON",
    "context": "JSON",
    "properties": "JSON",
}


def segment_lines(path: str, columns: dict[str, str]) -> Query:
    """The lines of a Segment NDJSON file with an explicit schema (`columns`: at least
    `SEGMENT_COLUMNS`), objects as JSON text (null when not an object) and the nested
    identifier fields as flat columns named by their path. No schema inference pass.

    Each object is parsed once for all its paths (a list of paths), and "is an object" is
    read from the first character of its JSON text (DuckDB writes values minified: an
    object starts with `{`, a string with `"`), not by parsing it again with `json_type`.
    """
    return Query(
        """
        SELECT * EXCLUDE (_t, _c) REPLACE (
                CASE WHEN left(traits, 1) = '{' THEN traits::VARCHAR END AS traits,
                CASE WHEN left(context, 1) = '{' THEN context::VARCHAR END AS context,
                CASE WHEN left(properties, 1) = '{' THEN properties::VARCHAR END
                    AS properties),
            _t[1]->>'$' AS "traits.email",
            _t[2]->>'$' AS "traits.phone",
            CASE WHEN left(_c[1], 1) = '{' THEN _c[1]::VARCHAR END AS "context.traits",
            _c[2]->>'$' AS "context.traits.email",
            _c[3]->>'$' AS "context.traits.phone",
            _c[4]->>'$' AS "context.device.id"
        FROM (
            SELECT *,
                CASE WHEN left(traits, 1) = '{'
                    THEN json_extract(traits, ['$.email', '$.phone']) END AS _t,
                CASE WHEN left(context, 1) = '{'
                    THEN json_extract(context,
                        ['$.traits', '$.traits.email', '$.traits.phone', '$.device.id']) END
                    AS _c
            FROM read_json($path, format = 'newline_delimited', columns = $columns)
        )
        """,
        {"path": path, "columns": columns},
    )


def row_hashes() -> Query:
    """md5 of each registered row key, in input order."""
    return Query("SELECT md5(k) AS h FROM ingest_row_keys")


def events_of_source(source_id: str) -> Query:
    """Event count of one source (used by tests and the CLI summary)."""
    return Query(
        "SELECT count(*) FROM events WHERE source_id = $source_id", {"source_id": source_id}
    )
