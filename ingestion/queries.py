"""DuckDB SQL of the ingestion package."""

from __future__ import annotations

from cdp.warehouse import Query

# Names under which the loader registers its Arrow inputs on its cursor (the SQL below
# spells them out: no SQL here is built from strings).
INCOMING = "ingest_incoming"
NEW_EVENTS = "ingest_new_events"
NEW_IDENTIFIERS = "ingest_new_identifiers"
NEW_BATCHES = "ingest_new_batches"
NEW_REJECTIONS = "ingest_new_rejections"
ROW_KEYS = "ingest_row_keys"


def counters() -> Query:
    """The highest event id and batch id committed so far."""
    return Query(
        "SELECT (SELECT coalesce(max(event_id), 0) FROM events),"
        " (SELECT coalesce(max(batch_id), 0) FROM ingest_batches)"
    )


def new_messages() -> Query:
    """Rows of the incoming load whose (source, message id) was never stored: first wins."""
    return Query(
        """
        WITH incoming_keys AS (
            SELECT _row, md5_number(source_id || chr(0) || message_id) AS message_key
            FROM ingest_incoming
        ), first_seen AS (
            SELECT _row, message_key FROM incoming_keys
            QUALIFY row_number() OVER (PARTITION BY message_key ORDER BY _row) = 1
        )
        SELECT f._row
        FROM first_seen AS f
        ANTI JOIN ingest_message_keys AS k ON k.message_key = f.message_key
        ORDER BY f._row
        """
    )


def insert_events() -> Query:
    """Append the registered new events."""
    return Query(
        "INSERT INTO events (event_id, message_id, source_id, batch_id, type, event, user_id,"
        " anonymous_id, timestamp, received_at, properties, traits, context)"
        " SELECT event_id, message_id, source_id, batch_id, type, event, user_id,"
        " anonymous_id, timestamp, received_at, properties, traits, context"
        " FROM ingest_new_events"
    )


def insert_segment_fields() -> Query:
    """Append the Segment-only fields of the new events that have any."""
    return Query(
        "INSERT INTO event_segment_fields (event_id, sent_at, original_timestamp, previous_id,"
        " group_id) SELECT event_id, sent_at, original_timestamp, previous_id, group_id"
        " FROM ingest_new_events WHERE sent_at IS NOT NULL OR original_timestamp IS NOT NULL"
        " OR previous_id IS NOT NULL OR group_id IS NOT NULL"
    )


def insert_identifiers() -> Query:
    """Append the registered identifiers of the new events."""
    return Query(
        "INSERT INTO event_identifiers (event_id, kind, value)"
        " SELECT event_id, kind, value FROM ingest_new_identifiers"
    )


def insert_keys() -> Query:
    """Remember the dedupe keys of the new events."""
    return Query(
        "INSERT INTO ingest_message_keys"
        " SELECT md5_number(source_id || chr(0) || message_id) FROM ingest_new_events"
    )


def insert_batches() -> Query:
    """Publish one row per source of this load."""
    return Query(
        "INSERT INTO ingest_batches (batch_id, source_id, channel, first_event_id,"
        " last_event_id, events, committed_at)"
        " SELECT batch_id, source_id, channel, first_event_id, last_event_id, events,"
        " committed_at FROM ingest_new_batches"
    )


def insert_batch_stats() -> Query:
    """Record the counters of each source of this load."""
    return Query(
        "INSERT INTO ingest_batch_stats (batch_id, source_id, received, duplicates, rejected,"
        " identifiers_dropped) SELECT batch_id, source_id, received, duplicates, rejected,"
        " identifiers_dropped FROM ingest_new_batches"
    )


def insert_rejections() -> Query:
    """Record the rejected messages or rows of this load."""
    return Query(
        "INSERT INTO ingest_rejections (source_id, channel, batch_id, import_id, position,"
        " message_id, reason, rejected_at) SELECT source_id, channel, batch_id, import_id,"
        " position, message_id, reason, rejected_at FROM ingest_new_rejections"
    )


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
