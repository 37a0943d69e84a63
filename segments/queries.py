"""DuckDB SQL of the segments package, as `Query` objects (compiled rules live in compiler.py)."""

from __future__ import annotations

from datetime import datetime

from cdp.warehouse import Query, quote_ident
from identity import service as identity_service

# The catalogue counts the values found at each JSON path by JSON type; the field type is
# derived when read (fields.json_field_type). Paths are discovered level by level: the keys of
# the documents, then, for the paths holding objects or lists, their keys and elements.
# Only keys that are plain identifiers are kept (and descended into).
_STATS = """
    count(*) AS n,
    count(*) FILTER (WHERE t IN ('BIGINT', 'UBIGINT', 'DOUBLE')) AS numbers,
    count(*) FILTER (WHERE t = 'BOOLEAN') AS booleans,
    count(*) FILTER (WHERE t = 'VARCHAR') AS strings,
    count(*) FILTER (WHERE t = 'VARCHAR' AND TRY_CAST(v ->> '$' AS TIMESTAMP) IS NOT NULL)
        AS timestamps,
    count(*) FILTER (WHERE t = 'OBJECT') AS objects,
    count(*) FILTER (WHERE t = 'ARRAY') AS arrays
"""
_KEY_OK = "regexp_full_match(key, '[A-Za-z_][A-Za-z0-9_]*')"

# The documents catalogued: (grp, doc) with grp the event name ('' for traits).
TRAIT_DOCS = "SELECT '' AS grp, traits AS doc FROM profiles WHERE json_type(traits) = 'OBJECT'"
EVENT_DOCS = (
    "SELECT event AS grp, properties AS doc FROM events"
    " WHERE event IS NOT NULL AND event_id > $after AND event_id <= $upto"
    " AND json_type(properties) = 'OBJECT'"
)


def top_level_stats(docs_sql: str, params: dict[str, object]) -> Query:
    """Value counts of the top-level keys of the documents, by group."""
    return Query(
        f"""
        SELECT grp, key AS path, {_STATS}
        FROM (
            SELECT grp, key, v, json_type(v) AS t
            FROM (
                SELECT grp, key, json_extract(doc, '$."' || key || '"') AS v
                FROM (SELECT grp, doc, unnest(json_keys(doc)) AS key FROM ({docs_sql}))
                WHERE {_KEY_OK}
            )
        )
        WHERE t <> 'NULL'
        GROUP BY ALL
        """,  # noqa: S608 - SQL of this module, values bound
        params,
    )


def nested_stats(docs_sql: str, params: dict[str, object], *, group: str, path: str) -> Query:
    """Value counts of the children of one container path: its keys and its list elements.

    The values at `path` are read with its JSON path (`[*]` for list elements, bound).
    """
    json_p = "$." + path.replace("[]", "[*]")
    # A path through list elements reads a list of values.
    value = "unnest(json_extract(doc, $jp))" if "[]" in path else "json_extract(doc, $jp)"
    values = f"SELECT {value} AS v FROM ({docs_sql}) WHERE grp = $grp"  # noqa: S608 - constants
    return Query(
        f"""
        WITH vals AS ({values}),
        children AS (
            SELECT $path || '.' || key AS path, json_extract(v, '$."' || key || '"') AS v
            FROM (SELECT v, unnest(json_keys(v)) AS key FROM vals WHERE json_type(v) = 'OBJECT')
            WHERE {_KEY_OK}
            UNION ALL
            SELECT $path || '[]' AS path, unnest(json_extract(v, '$[*]')) AS v
            FROM vals WHERE json_type(v) = 'ARRAY'
        )
        SELECT $grp AS grp, path, {_STATS}
        FROM (SELECT path, v, json_type(v) AS t FROM children)
        WHERE t <> 'NULL'
        GROUP BY ALL
        """,  # noqa: S608 - SQL of this module, values bound
        {**params, "jp": json_p, "grp": group, "path": path},
    )


def event_counts(after: int, upto: int) -> Query:
    """How many events of each name in a range of event ids."""
    return Query(
        "SELECT event AS grp, count(*) AS n FROM events WHERE event IS NOT NULL"
        " AND event_id > $after AND event_id <= $upto GROUP BY event",
        {"after": after, "upto": upto},
    )


MAX_EVENT_ID = Query("SELECT coalesce(max(event_id), 0) FROM events")
_CATALOG_COLUMNS = "numbers, booleans, strings, timestamps, objects, arrays"
TRAIT_CATALOG = Query(
    f"SELECT path, profiles, {_CATALOG_COLUMNS} FROM segment_trait_catalog ORDER BY path"  # noqa: S608 - constant
)
EVENT_CATALOG = Query(
    f"SELECT event, path, events, {_CATALOG_COLUMNS} FROM segment_event_catalog"  # noqa: S608 - constant
    " ORDER BY event, path"
)
CLEAR_TRAIT_CATALOG = Query("DELETE FROM segment_trait_catalog")
CLEAR_EVENT_CATALOG = Query("DELETE FROM segment_event_catalog")
# Stats of new events are added to the stored ones (seg_cat_new: same columns).
MERGE_EVENT_CATALOG = Query(
    """
    CREATE OR REPLACE TEMP TABLE seg_cat_merged AS
    SELECT event, path, sum(events)::BIGINT, sum(numbers)::BIGINT, sum(booleans)::BIGINT,
           sum(strings)::BIGINT, sum(timestamps)::BIGINT, sum(objects)::BIGINT,
           sum(arrays)::BIGINT
    FROM (SELECT * FROM segment_event_catalog UNION ALL SELECT * FROM seg_cat_new)
    GROUP BY event, path;
    DELETE FROM segment_event_catalog;
    INSERT INTO segment_event_catalog SELECT * FROM seg_cat_merged;
    DROP TABLE seg_cat_merged;
    DROP TABLE seg_cat_new
    """
)

ATTRIBUTE_COLUMNS = Query(
    """
    SELECT column_name, data_type FROM duckdb_columns()
    WHERE table_name = 'profile_attributes' AND schema_name = 'main'
      AND column_name NOT IN ('profile_id', 'computed_at')
    ORDER BY column_index
    """
)

EVENT_PROFILES_TABLE = "SELECT event, timestamp, event_id, profile_id FROM segment_event_profiles"


def materialise_event_profiles(relation_sql: str) -> Query:
    """Replace the event map with a relation `(event, timestamp, event_id, profile_id)`
    (parameter-free), sorted by event and time so a condition scans its event's rows only."""
    return Query(
        "CREATE OR REPLACE TABLE segment_event_profiles AS"  # noqa: S608 - SQL from code
        f" SELECT * FROM ({relation_sql}) ORDER BY event, timestamp"
    )


# The watermark of the data attributes are computed from: profiles change when identity runs.
# Identity's profiles version (bumped with every write to `profiles`): reading it is a lookup
# in a small table, where counting the profiles scanned 1.2M rows at 1M customers.
PROFILES_WATERMARK = Query(
    "SELECT 'v' || (" + identity_service.profiles_version_sql() + ")::VARCHAR"
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


def attribute_values(profile_ids: list[str], columns: list[str]) -> Query:
    """Some attribute columns of these profiles (a semi-join on the bound id list); `columns`
    must be existing columns of `profile_attributes` (see `ATTRIBUTE_COLUMNS`)."""
    selected = "".join(f", {quote_ident(c)}" for c in columns)
    return Query(
        f"""
        SELECT profile_id{selected} FROM profile_attributes
        WHERE profile_id IN (SELECT unnest($ids))
        """,  # noqa: S608 - column names come from the table's own catalogue, quoted
        {"ids": profile_ids},
    )


def memberships_among(segment_ids: list[str], profile_ids: list[str]) -> Query:
    """The current memberships of these segments among these profiles."""
    return Query(
        """
        SELECT segment_id, profile_id FROM segment_membership
        WHERE list_contains($sids, segment_id) AND profile_id IN (SELECT unnest($ids))
        """,
        {"sids": segment_ids, "ids": profile_ids},
    )


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
    segment_id: str,
    *,
    refresh_id: int,
    version: int,
    at: datetime,
    seq: int,
    mode: str,
    evaluated: int,
) -> Query:
    """Record the size and the changes of this refresh, and how it evaluated the rule."""
    return Query(
        """
        INSERT INTO segment_refreshes
            (refresh_id, segment_id, segment_version, refreshed_at, size, entries, exits, mode,
             evaluated)
        SELECT $refresh, $sid, $version, $at,
               (SELECT count(*) FROM segment_membership WHERE segment_id = $sid),
               (SELECT count(*) FROM segment_events WHERE seq > $seq AND kind = 'entry'),
               (SELECT count(*) FROM segment_events WHERE seq > $seq AND kind = 'exit'),
               $mode, $evaluated
        """,
        {
            "refresh": refresh_id,
            "sid": segment_id,
            "version": version,
            "at": at,
            "seq": seq,
            "mode": mode,
            "evaluated": evaluated,
        },
    )


# Incremental refresh.

PROFILES_MARK = Query("SELECT max(updated_at) FROM profiles")
PROFILE_COUNT = Query("SELECT count(*) FROM profiles")


def refresh_marks(segment_id: str) -> Query:
    """What the last refresh of a segment saw."""
    return Query(
        "SELECT fingerprint, profiles_mark, attributes_mark, attributes_digest"
        " FROM segment_refresh_marks WHERE segment_id = $sid",
        {"sid": segment_id},
    )


def write_refresh_marks(
    segment_id: str,
    *,
    fingerprint: str,
    profiles_mark: datetime | None,
    attributes_mark: datetime | None,
    attributes_digest: str | None,
) -> Query:
    """Remember what this refresh saw."""
    return Query(
        "INSERT OR REPLACE INTO segment_refresh_marks VALUES ($sid, $fp, $pm, $am, $ad)",
        {
            "sid": segment_id,
            "fp": fingerprint,
            "pm": profiles_mark,
            "am": attributes_mark,
            "ad": attributes_digest,
        },
    )


def touched_profiles(since: datetime) -> Query:
    """Temp table seg_touched: the profiles identity rewrote after a mark.

    A mark is the `updated_at` of a resolution run seen committed; runs are serialised and
    each stamps its profiles with its own start time, so a later run stamps a later time.
    """
    return Query(
        "CREATE OR REPLACE TEMP TABLE seg_touched AS"
        " SELECT profile_id FROM profiles WHERE updated_at > $since",
        {"since": since},
    )


def incremental_members(segment_id: str, evaluated: Query) -> Query:
    """Temp table seg_new: the members of untouched live profiles stay, touched profiles are
    members when the rule (restricted to them) selects them."""
    return Query(
        f"""
        CREATE OR REPLACE TEMP TABLE seg_new AS
        SELECT profile_id FROM segment_membership
        WHERE segment_id = $sid
          AND profile_id NOT IN (SELECT profile_id FROM seg_touched)
          AND profile_id IN (SELECT profile_id FROM profiles)
        UNION ALL
        SELECT profile_id FROM (
        {evaluated.sql}
        )
        """,  # noqa: S608 - the compiled rule (values bound) from compiler.py
        {**evaluated.params, "sid": segment_id},
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


def profile_memberships(profile_id: str) -> Query:
    """The segments a profile is in now, and since when."""
    return Query(
        "SELECT segment_id, entered_at FROM segment_membership WHERE profile_id = $pid"
        " ORDER BY entered_at, segment_id",
        {"pid": profile_id},
    )


def profile_segment_events(profile_id: str) -> Query:
    """A profile's entries into and exits from segments, oldest first."""
    return Query(
        "SELECT segment_id, kind, occurred_at FROM segment_events WHERE profile_id = $pid"
        " ORDER BY seq",
        {"pid": profile_id},
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
        SELECT refresh_id, segment_version, refreshed_at, size, entries, exits,
               coalesce(mode, 'full') AS mode, evaluated
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


# Materialised property values (segment_property_values): the value(s) at a field path of an
# event's properties, parsed once. The extraction is the compiler's own
# (`json_extract_string` with the same bound JSON path; one row per list element), so a
# filter on these rows selects exactly the events a filter on the JSON selects.
PROPERTY_PATHS = Query("SELECT event, path, upto FROM segment_property_paths ORDER BY event, path")


def append_property_values(
    event: str, path: str, json_p: str, *, is_list: bool, after: int, upto: int
) -> Query:
    """Insert the values at one path of one event's events with id in `(after, upto]`.

    `json_p` is the path's bound JSON path; through list elements one row per element. One
    path per statement keeps the memory of a first build small (a year of orders' JSON would
    otherwise be held and sorted at once); rows are sorted by time so a window reads its
    part of the path only.
    """
    value = "json_extract_string(properties, $jp)"
    if is_list:
        value = f"unnest({value})"
    return Query(
        f"""
        INSERT INTO segment_property_values
        SELECT $event, $path, timestamp, event_id, value
        FROM (
            SELECT timestamp, event_id, {value} AS value FROM events
            WHERE event = $event AND event_id > $after AND event_id <= $upto
        )
        WHERE value IS NOT NULL
        ORDER BY timestamp
        """,  # noqa: S608 - SQL of this module, values bound
        {"event": event, "path": path, "jp": json_p, "after": after, "upto": upto},
    )


def set_property_path(event: str, path: str, upto: int) -> Query:
    """Record that one (event, path) is materialised up to the event id `upto`."""
    return Query(
        "INSERT OR REPLACE INTO segment_property_paths VALUES ($event, $path, $upto)",
        {"event": event, "path": path, "upto": upto},
    )


# Rows of events that are gone (erased): they never match (event conditions read the events
# through the event map, which holds live events only), this only reclaims their space.
PRUNE_PROPERTY_VALUES = Query(
    """
    DELETE FROM segment_property_values WHERE event_id IN (
        SELECT event_id FROM segment_property_values
        EXCEPT
        SELECT event_id FROM events
    )
    """
)
ERASURES_MARK = Query("SELECT coalesce(max(seq), 0) FROM profile_erasures")


# The profiles watermark (the row whose name is NULL) and ALL_STATE's rows, in no order (the
# caller sorts; an ORDER BY made this per-compile query a third slower): one round trip.
STATE_AND_WATERMARK = Query(
    f"""
    SELECT NULL AS name, ({PROFILES_WATERMARK.sql}) AS text, NULL AS updated_at
    UNION ALL
    SELECT name, text, updated_at FROM segment_state
    """  # noqa: S608 - constants
)
