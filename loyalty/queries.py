"""Warehouse SQL of the loyalty engine (DuckDB), as `Query` objects."""

from __future__ import annotations

from collections.abc import Sequence

from cdp.warehouse import Query


def max_event_id() -> Query:
    """The highest event id loaded so far (0 when the warehouse is empty)."""
    return Query("SELECT coalesce(max(event_id), 0) FROM events")


# The type `properties.products` is read as (the engine's per-line formulas).
PRODUCTS_TYPE = (
    '[{"sku": "VARCHAR", "category": "VARCHAR", "brand": "VARCHAR", "price": "DOUBLE",'
    ' "quantity": "DOUBLE"}]'
)


def events_between(
    *,
    after_event_id: int,
    up_to_event_id: int,
    names: list[str],
    paths: Sequence[str] = (),
    products: bool = False,
    since: object = None,
    until: object = None,
    event_profiles: str | None = None,
) -> Query:
    """Events of the given names with `after < event_id <= up_to`, in id order.

    The JSON properties at `paths` come as text columns `f0, f1, ...` and, with `products`,
    `properties.products` as a list of structs: DuckDB parses them once, in parallel, so the
    engine does not parse JSON text row by row. With `event_profiles` (identity's relation
    over a CTE `scoped_events`), each event also comes with its `profile_id` (null when not
    resolved), looked up for the selected events only.
    """
    params: dict[str, object] = {
        "after": after_event_id,
        "up_to": up_to_event_id,
        "names": names,
        "since": since,
        "until": until,
    }
    extra = ""
    for i, path in enumerate(paths):
        params[f"path{i}"] = "$." + path
        extra += f", json_extract_string(properties, $path{i}) AS f{i}"
    if products:
        extra += (
            f", from_json(json_extract(properties, '$.products'), '{PRODUCTS_TYPE}') AS products"
        )
    where = """
        WHERE {t}event_id > $after AND {t}event_id <= $up_to AND list_contains($names, event)
          AND ($since IS NULL OR timestamp >= $since) AND ($until IS NULL OR timestamp < $until)
    """
    if event_profiles is None:
        return Query(
            f"""
            SELECT event_id, message_id, source_id, type, event, timestamp,
                   CAST(properties AS VARCHAR) AS properties{extra}
            FROM events {where.format(t="")}
            ORDER BY event_id
            """,  # noqa: S608 - the extra columns are code-built; paths and values are parameters
            params,
        )
    return Query(
        f"""
        WITH scoped_events AS (SELECT event_id FROM events {where.format(t="")}),
        event_profile AS ({event_profiles})
        SELECT e.event_id, message_id, source_id, type, event, timestamp,
               CAST(properties AS VARCHAR) AS properties{extra}, ep.profile_id
        FROM events AS e
        LEFT JOIN event_profile AS ep ON ep.event_id = e.event_id
        {where.format(t="e.")}
        ORDER BY e.event_id
        """,  # noqa: S608 - columns and the relation are code constants; values are parameters
        params,
    )


def order_totals(*, since: object, until: object, event_profiles: str) -> Query:
    """`Order Completed` events in a period: how many, their amount (`total`, else `revenue`)
    and how many distinct buyers (resolved profiles; `event_profiles` is identity's
    parameter-free `(event_id, profile_id)` relation)."""
    return Query(
        f"""
        SELECT count(*) AS orders,
               coalesce(sum(coalesce(
                   TRY_CAST(json_extract_string(events.properties, '$.total') AS DOUBLE),
                   TRY_CAST(json_extract_string(events.properties, '$.revenue') AS DOUBLE),
                   0)), 0) AS amount,
               count(DISTINCT ep.profile_id) AS buyers
        FROM events
        LEFT JOIN ({event_profiles}) AS ep USING (event_id)
        WHERE event = 'Order Completed' AND timestamp >= $since AND timestamp < $until
        """,  # noqa: S608 - the relation is identity's constant SQL; values are parameters
        {"since": since, "until": until},
    )


# The loyalty fields of a profile for the segment catalogue: one row per profile, from its
# membership of the oldest programme it belongs to (a platform usually runs one programme).
MEMBER_FIELDS_RELATION = """
SELECT profile_id, tier, balance, enrolled, enrolled_at
FROM (
    SELECT profile_id, tier, balance, enrolled, enrolled_at,
           row_number() OVER (
               PARTITION BY profile_id ORDER BY program_created_at, program_id
           ) AS pick
    FROM loyalty_member_snapshot
) AS ranked
WHERE pick = 1
"""


# Replace the member snapshot with the registered frame `snapshot_frame`, in one transaction.
DELETE_SNAPSHOT = "DELETE FROM loyalty_member_snapshot"
# The rows of the memberships `$members` and of the profiles `$profiles` (lists of ids).
DELETE_SNAPSHOT_ROWS = """
DELETE FROM loyalty_member_snapshot
WHERE member_id IN (SELECT unnest(CAST($members AS VARCHAR[])))
   OR profile_id IN (SELECT unnest(CAST($profiles AS VARCHAR[])))
"""
DELETE_SNAPSHOT_RANGE = """
DELETE FROM loyalty_member_snapshot
WHERE member_id > $after AND ($through IS NULL OR member_id <= $through)
"""
INSERT_SNAPSHOT = "INSERT INTO loyalty_member_snapshot BY NAME SELECT * FROM snapshot_frame"


def birthday_profiles(codes: list[int]) -> Query:
    """Profiles whose `birth_date` trait (ISO date) falls on one of the `month*100+day` codes,
    with their traits as JSON text."""
    return Query(
        """
        SELECT profile_id, CAST(traits AS VARCHAR) AS traits
        FROM profiles
        WHERE list_contains($codes, CAST(strftime(
            TRY_CAST(left(json_extract_string(traits, '$.birth_date'), 10) AS DATE), '%m%d'
        ) AS INTEGER))
        ORDER BY profile_id
        """,
        {"codes": codes},
    )


def profile_traits(profile_ids: list[str]) -> Query:
    """The traits (JSON text) of these profiles, for `traits.*` conditions: a semi-join on
    the bound id list, one scan of `profiles` for a whole batch."""
    return Query(
        """
        SELECT profile_id, CAST(traits AS VARCHAR) AS traits
        FROM profiles
        WHERE profile_id IN (SELECT unnest($ids))
        """,
        {"ids": profile_ids},
    )


def event_profiles_of(event_ids: list[int], *, event_profiles: str) -> Query:
    """The profile each of these events belongs to now (`event_profiles` is identity's
    parameter-free `(event_id, profile_id)` relation); erased or unresolved events are absent."""
    return Query(
        f"""
        SELECT ep.event_id, ep.profile_id
        FROM ({event_profiles}) AS ep
        WHERE ep.event_id IN (SELECT unnest($ids))
        ORDER BY ep.event_id
        """,  # noqa: S608 - the relation is identity's constant SQL; values are parameters
        {"ids": event_ids},
    )


def time_boundaries(*, up_to_event_id: int, names: list[str], batches: int) -> Query:
    """Timestamps cutting the events of these names up to an id into `batches` time slices
    of about equal size (the first and last slices are open-ended)."""
    return Query(
        """
        SELECT DISTINCT unnest(quantile_disc(timestamp, $cuts)) AS cut
        FROM events WHERE event_id <= $up_to AND list_contains($names, event)
        ORDER BY cut
        """,
        {
            "up_to": up_to_event_id,
            "names": names,
            "cuts": [i / batches for i in range(1, batches)] or [0.5],
        },
    )


def count_events(*, up_to_event_id: int, names: list[str]) -> Query:
    """How many events of these names up to an id."""
    return Query(
        "SELECT count(*) FROM events WHERE event_id <= $up_to AND list_contains($names, event)",
        {"up_to": up_to_event_id, "names": names},
    )
