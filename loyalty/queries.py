"""Warehouse SQL of the loyalty engine (DuckDB), as `Query` objects."""

from __future__ import annotations

from cdp.warehouse import Query


def max_event_id() -> Query:
    """The highest event id loaded so far (0 when the warehouse is empty)."""
    return Query("SELECT coalesce(max(event_id), 0) FROM events")


def events_between(*, after_event_id: int, up_to_event_id: int, names: list[str]) -> Query:
    """Events of the given names with `after < event_id <= up_to`, in id order."""
    return Query(
        """
        SELECT event_id, message_id, source_id, type, event, timestamp,
               CAST(properties AS VARCHAR) AS properties
        FROM events
        WHERE event_id > $after AND event_id <= $up_to AND list_contains($names, event)
        ORDER BY event_id
        """,
        {"after": after_event_id, "up_to": up_to_event_id, "names": names},
    )


def interim_event_profiles(*, after_event_id: int, up_to_event_id: int) -> Query:
    """Profile of each event until identity resolution is wired in: the user id, else the
    anonymous id (the identifiers the event itself carries)."""
    return Query(
        """
        SELECT event_id, coalesce(user_id, anonymous_id) AS profile_id
        FROM events
        WHERE event_id > $after AND event_id <= $up_to
        """,
        {"after": after_event_id, "up_to": up_to_event_id},
    )


def order_totals(*, since: object, until: object) -> Query:
    """`Order Completed` events in a period: how many, their amount (`total`, else `revenue`)
    and how many distinct buyers (the interim profile: user id, else anonymous id)."""
    return Query(
        """
        SELECT count(*) AS orders,
               coalesce(sum(coalesce(
                   TRY_CAST(json_extract_string(properties, '$.total') AS DOUBLE),
                   TRY_CAST(json_extract_string(properties, '$.revenue') AS DOUBLE),
                   0)), 0) AS amount,
               count(DISTINCT coalesce(user_id, anonymous_id)) AS buyers
        FROM events
        WHERE event = 'Order Completed' AND timestamp >= $since AND timestamp < $until
        """,
        {"since": since, "until": until},
    )
