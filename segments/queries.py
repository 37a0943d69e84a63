"""DuckDB SQL of the segments package, as `Query` objects (compiled rules live in compiler.py)."""

from __future__ import annotations

from datetime import datetime

from cdp.warehouse import Query

# Raw JSON types of values are kept in the catalogues; the field type is derived when read.
_JSON_TYPE = """
    CASE WHEN bool_and(t IN ('BIGINT', 'UBIGINT', 'DOUBLE')) THEN 'number'
         WHEN bool_and(t = 'BOOLEAN') THEN 'boolean'
         WHEN bool_and(t = 'VARCHAR') AND bool_and(TRY_CAST(v ->> '$' AS TIMESTAMP) IS NOT NULL)
              THEN 'timestamp'
         WHEN bool_and(t IN ('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE', 'BOOLEAN')) THEN 'string'
    END
"""

REFRESH_TRAIT_CATALOG = Query(
    f"""
    DELETE FROM segment_trait_catalog;
    INSERT INTO segment_trait_catalog
    SELECT key, {_JSON_TYPE} AS type, count(*) AS profiles
    FROM (
        SELECT key, v, json_type(v) AS t
        FROM (
            SELECT key, json_extract(traits, '$."' || key || '"') AS v
            FROM (SELECT traits, unnest(json_keys(traits)) AS key FROM profiles
                  WHERE json_type(traits) = 'OBJECT')
        )
    )
    WHERE t <> 'NULL' AND regexp_full_match(key, '[A-Za-z_][A-Za-z0-9_]*')
    GROUP BY key
    HAVING type IS NOT NULL
    """  # noqa: S608 - constant SQL, no values
)

REFRESH_EVENT_CATALOG = Query(
    f"""
    DELETE FROM segment_event_catalog;
    INSERT INTO segment_event_catalog
    SELECT event, NULL, NULL, count(*) FROM events WHERE event IS NOT NULL GROUP BY event;
    INSERT INTO segment_event_catalog
    SELECT event, key, {_JSON_TYPE} AS type, count(*)
    FROM (
        SELECT event, key, v, json_type(v) AS t
        FROM (
            SELECT event, key, json_extract(properties, '$."' || key || '"') AS v
            FROM (SELECT event, properties, unnest(json_keys(properties)) AS key FROM events
                  WHERE event IS NOT NULL AND json_type(properties) = 'OBJECT')
        )
    )
    WHERE t <> 'NULL' AND regexp_full_match(key, '[A-Za-z_][A-Za-z0-9_]*')
    GROUP BY event, key
    HAVING type IS NOT NULL
    """  # noqa: S608 - constant SQL, no values
)

TRAIT_CATALOG = Query("SELECT trait, type, profiles FROM segment_trait_catalog ORDER BY trait")
EVENT_CATALOG = Query(
    "SELECT event, property, type, events FROM segment_event_catalog ORDER BY event, property"
)

ATTRIBUTE_COLUMNS = Query(
    """
    SELECT column_name, data_type FROM duckdb_columns()
    WHERE table_name = 'profile_attributes' AND schema_name = 'main'
      AND column_name NOT IN ('profile_id', 'computed_at')
    ORDER BY column_index
    """
)

EVENT_PROFILES_TABLE = "SELECT event_id, profile_id FROM segment_event_profiles"


def materialise_event_profiles(relation_sql: str) -> Query:
    """Replace the event -> profile map with identity's current relation (parameter-free)."""
    return Query(f"CREATE OR REPLACE TABLE segment_event_profiles AS {relation_sql}")


# The watermark of the data attributes are computed from: profiles change when identity runs.
PROFILES_WATERMARK = Query(
    "SELECT count(*)::VARCHAR || '/' || coalesce(max(updated_at)::VARCHAR, '') FROM profiles"
)


ALL_STATE = Query("SELECT name, text, updated_at FROM segment_state ORDER BY name")


def read_state(name: str) -> Query:
    """One mark of the package."""
    return Query("SELECT text, updated_at FROM segment_state WHERE name = $name", {"name": name})


def write_state(name: str, text: str, at: datetime) -> Query:
    """Set one mark of the package."""
    return Query(
        "INSERT OR REPLACE INTO segment_state VALUES ($name, $text, $at)",
        {"name": name, "text": text, "at": at},
    )


def profile_attributes(profile_id: str) -> Query:
    """The computed attributes of one profile."""
    return Query("SELECT * FROM profile_attributes WHERE profile_id = $pid", {"pid": profile_id})


# Membership refresh: the compiled rule is first materialised into `seg_new` (one column,
# profile_id); these steps then diff it against the stored membership on the same cursor.


def record_changes(
    segment_id: str, *, seq: int, refresh_id: int, version: int, at: datetime
) -> Query:
    """Append the entries and exits of this refresh to `segment_events`, numbered after seq."""
    return Query(
        """
        INSERT INTO segment_events
        SELECT $seq + row_number() OVER (ORDER BY kind, profile_id), $sid, profile_id, kind, $at,
               $refresh, $version
        FROM (
            SELECT profile_id, 'entry' AS kind FROM seg_new
            WHERE profile_id NOT IN (SELECT profile_id FROM segment_membership
                                     WHERE segment_id = $sid)
            UNION ALL
            SELECT profile_id, 'exit' FROM segment_membership
            WHERE segment_id = $sid AND profile_id NOT IN (SELECT profile_id FROM seg_new)
        )
        """,
        {"seq": seq, "sid": segment_id, "at": at, "refresh": refresh_id, "version": version},
    )


def delete_exits(segment_id: str) -> Query:
    """Remove the members that left."""
    return Query(
        """
        DELETE FROM segment_membership
        WHERE segment_id = $sid AND profile_id NOT IN (SELECT profile_id FROM seg_new)
        """,
        {"sid": segment_id},
    )


def insert_entries(segment_id: str, at: datetime) -> Query:
    """Add the members that entered."""
    return Query(
        """
        INSERT INTO segment_membership
        SELECT $sid, profile_id, $at FROM seg_new
        WHERE profile_id NOT IN (SELECT profile_id FROM segment_membership WHERE segment_id = $sid)
        """,
        {"sid": segment_id, "at": at},
    )


def record_refresh(
    segment_id: str, *, refresh_id: int, version: int, at: datetime, seq: int
) -> Query:
    """Record the size and the changes of this refresh."""
    return Query(
        """
        INSERT INTO segment_refreshes
        SELECT $refresh, $sid, $version, $at,
               (SELECT count(*) FROM segment_membership WHERE segment_id = $sid),
               (SELECT count(*) FROM segment_events WHERE seq > $seq AND kind = 'entry'),
               (SELECT count(*) FROM segment_events WHERE seq > $seq AND kind = 'exit')
        """,
        {"refresh": refresh_id, "sid": segment_id, "version": version, "at": at, "seq": seq},
    )


NEXT_SEQ = Query("SELECT coalesce(max(seq), 0) FROM segment_events")
NEXT_REFRESH_ID = Query("SELECT coalesce(max(refresh_id), 0) + 1 FROM segment_refreshes")


def members(segment_id: str, *, limit: int, offset: int) -> Query:
    """One page of current members, with their traits."""
    return Query(
        """
        SELECT m.profile_id, m.entered_at, p.traits
        FROM segment_membership m LEFT JOIN profiles p ON p.profile_id = m.profile_id
        WHERE m.segment_id = $sid
        ORDER BY m.profile_id LIMIT $limit OFFSET $offset
        """,
        {"sid": segment_id, "limit": limit, "offset": offset},
    )


def member_count(segment_id: str) -> Query:
    """How many members the segment has now."""
    return Query(
        "SELECT count(*) FROM segment_membership WHERE segment_id = $sid", {"sid": segment_id}
    )


def export_members(segment_id: str) -> Query:
    """Every current member with traits (as JSON text) and computed attributes."""
    return Query(
        """
        SELECT m.profile_id, m.entered_at, p.traits::VARCHAR AS traits,
               a.* EXCLUDE (profile_id, computed_at)
        FROM segment_membership m
        LEFT JOIN profiles p ON p.profile_id = m.profile_id
        LEFT JOIN profile_attributes a ON a.profile_id = m.profile_id
        WHERE m.segment_id = $sid
        ORDER BY m.profile_id
        """,
        {"sid": segment_id},
    )


def refreshes(segment_id: str, *, limit: int, offset: int) -> Query:
    """The size over time of a segment, newest first."""
    return Query(
        """
        SELECT refresh_id, segment_version, refreshed_at, size, entries, exits
        FROM segment_refreshes WHERE segment_id = $sid
        ORDER BY refresh_id DESC LIMIT $limit OFFSET $offset
        """,
        {"sid": segment_id, "limit": limit, "offset": offset},
    )


def refresh_count(segment_id: str) -> Query:
    """How many refreshes a segment had."""
    return Query(
        "SELECT count(*) FROM segment_refreshes WHERE segment_id = $sid", {"sid": segment_id}
    )


def events_since(after_seq: int, segment_id: str | None, limit: int) -> Query:
    """Published entries and exits after a sequence number, in order."""
    return Query(
        """
        SELECT seq, segment_id, profile_id, kind, occurred_at, refresh_id, segment_version
        FROM segment_events
        WHERE seq > $after AND ($sid IS NULL OR segment_id = $sid)
        ORDER BY seq LIMIT $limit
        """,
        {"after": after_seq, "sid": segment_id, "limit": limit},
    )


def forget_segment(segment_id: str) -> Query:
    """Drop the current membership of a deleted segment (history stays)."""
    return Query("DELETE FROM segment_membership WHERE segment_id = $sid", {"sid": segment_id})


def sample_profiles(limit: int) -> Query:
    """A sample of the matching profiles of a preview, from temp table seg_preview."""
    return Query(
        """
        SELECT p.profile_id, p.traits FROM profiles p
        SEMI JOIN seg_preview s ON s.profile_id = p.profile_id
        ORDER BY p.profile_id LIMIT $limit
        """,
        {"limit": limit},
    )
