"""DuckDB SQL of the ingestion package."""

from __future__ import annotations

from cdp.warehouse import Query

# Names under which the loader registers its Arrow inputs on its cursor (the SQL below
# spells them out: no SQL here is built from strings).
INCOMING = "ingest_incoming"
INCOMING_IDENTIFIERS = "ingest_incoming_identifiers"
LOAD_SOURCES = "ingest_load_sources"
NEW_REJECTIONS = "ingest_new_rejections"
ROW_KEYS = "ingest_row_keys"


def counters() -> Query:
    """The highest event id and batch id committed so far."""
    return Query(
        "SELECT (SELECT coalesce(max(event_id), 0) FROM events),"
        " (SELECT coalesce(max(batch_id), 0) FROM ingest_batches)"
    )


# One load, run as one script inside the loader's transaction (one call into DuckDB, so
# the writer thread gives up and retakes the GIL once, not once per statement). Inputs:
# ingest_incoming (events with `_row`), ingest_incoming_identifiers (`_row`, kind, value),
# ingest_load_sources (per source: batch_id, offered, rejected, dropped, and the load's
# first_event_id, channel and committed_at on every row), ingest_new_rejections.
_KEPT = """
CREATE OR REPLACE TEMP TABLE ingest_kept AS
SELECT f._row, f.message_key,
       (SELECT any_value(first_event_id) FROM ingest_load_sources) - 1
         + row_number() OVER (ORDER BY f._row) AS event_id
FROM (
    SELECT min(_row) AS _row, md5_number(source_id || chr(0) || message_id) AS message_key
    FROM ingest_incoming
    GROUP BY message_key
) AS f
ANTI JOIN ingest_message_keys AS k ON k.message_key = f.message_key
"""
_EVENTS = """
INSERT INTO events (event_id, message_id, source_id, batch_id, type, event, user_id,
    anonymous_id, timestamp, received_at, properties, traits, context)
SELECT k.event_id, i.message_id, i.source_id, s.batch_id, i.type, i.event, i.user_id,
    i.anonymous_id, i.timestamp, i.received_at, i.properties, i.traits, i.context
FROM ingest_kept AS k
JOIN ingest_incoming AS i ON i._row = k._row
JOIN ingest_load_sources AS s ON s.source_id = i.source_id
ORDER BY k.event_id
"""
_KEYS = "INSERT INTO ingest_message_keys SELECT message_key FROM ingest_kept"
_SEGMENT_FIELDS = """
INSERT INTO event_segment_fields (event_id, sent_at, original_timestamp, previous_id, group_id)
SELECT k.event_id, i.sent_at, i.original_timestamp, i.previous_id, i.group_id
FROM ingest_kept AS k JOIN ingest_incoming AS i ON i._row = k._row
WHERE i.sent_at IS NOT NULL OR i.original_timestamp IS NOT NULL
   OR i.previous_id IS NOT NULL OR i.group_id IS NOT NULL
"""
_IDENTIFIERS = """
INSERT INTO event_identifiers (event_id, kind, value)
SELECT k.event_id, d.kind, d.value
FROM ingest_kept AS k JOIN ingest_incoming_identifiers AS d ON d._row = k._row
"""
_REJECTIONS = """
INSERT INTO ingest_rejections (source_id, channel, batch_id, import_id, position,
    message_id, reason, rejected_at)
SELECT r.source_id, s.channel, s.batch_id, s.import_id, r.position, r.message_id, r.reason,
    s.committed_at
FROM ingest_new_rejections AS r JOIN ingest_load_sources AS s ON s.source_id = r.source_id
"""
_STORED = """
CREATE OR REPLACE TEMP TABLE ingest_load_counts AS
SELECT s.batch_id, s.source_id, s.channel, s.committed_at, s.offered, s.rejected, s.dropped,
       count(k.event_id) AS events, min(k.event_id) AS first_event_id,
       max(k.event_id) AS last_event_id
FROM ingest_load_sources AS s
LEFT JOIN (
    SELECT k.event_id, i.source_id
    FROM ingest_kept AS k JOIN ingest_incoming AS i ON i._row = k._row
) AS k ON k.source_id = s.source_id
GROUP BY ALL
"""
_BATCHES = """
INSERT INTO ingest_batches (batch_id, source_id, channel, first_event_id, last_event_id,
    events, committed_at)
SELECT batch_id, source_id, channel, first_event_id, last_event_id, events, committed_at
FROM ingest_load_counts
"""
_BATCH_STATS = """
INSERT INTO ingest_batch_stats (batch_id, source_id, received, duplicates, rejected,
    identifiers_dropped)
SELECT batch_id, source_id, offered + rejected, offered - events, rejected, dropped
FROM ingest_load_counts
"""
_RESULT = """
SELECT batch_id, source_id, events, offered - events AS duplicates, rejected,
       first_event_id, last_event_id
FROM ingest_load_counts ORDER BY batch_id
"""


def load_script(*, rejections: bool) -> Query:
    """Dedupe, number, append and publish one load; returns one row per source."""
    steps = [_KEPT, _EVENTS, _KEYS, _SEGMENT_FIELDS, _IDENTIFIERS]
    if rejections:
        steps.append(_REJECTIONS)
    steps += [_STORED, _BATCHES, _BATCH_STATS, _RESULT]
    return Query(";\n".join(step.strip() for step in steps))


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


def row_hashes() -> Query:
    """md5 of each registered row key, in input order."""
    return Query("SELECT md5(k) AS h FROM ingest_row_keys")


def events_of_source(source_id: str) -> Query:
    """Event count of one source (used by tests and the CLI summary)."""
    return Query(
        "SELECT count(*) FROM events WHERE source_id = $source_id", {"source_id": source_id}
    )
