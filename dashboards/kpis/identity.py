"""Identity metrics: merges published, identifiers per profile, from identity's tables."""

from __future__ import annotations

from datetime import date

from cdp.warehouse import Query
from dashboards.metrics import Breakdown, Grain, Metric
from dashboards.queries import metric_params

_MERGES_SQL = """
SELECT CAST(date_trunc($grain, occurred_at) AS DATE) AS period,
       CAST(NULL AS VARCHAR) AS key,
       count(*) AS value
FROM profile_merges
WHERE kind = 'merge' AND occurred_at >= $start AND occurred_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""

# A level known only now: one value, on today's period, when the range includes today (the
# daily snapshot job keeps the history).
_PER_PROFILE_SQL = """
WITH live AS (SELECT count(*) AS profiles FROM profiles)
SELECT CAST(date_trunc($grain, CAST(now() AS DATE)) AS DATE) AS period,
       CASE $breakdown WHEN 'identifier_kind' THEN n.kind END AS key,
       count(*) / max(live.profiles) AS value
FROM identity_nodes AS n, live
WHERE n.profile_id IS NOT NULL AND live.profiles > 0
  AND CAST(now() AS DATE) >= CAST($start AS DATE) AND CAST(now() AS DATE) < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""


# Occurrences in events of identifiers that identity blocks now: a blocked value or pattern
# (`blocked`) or an identifier over the automatic cap (`capped`), by the events' received day.
BLOCKED_BREAKDOWNS: tuple[Breakdown, ...] = ("status", "identifier_kind")
_BLOCKED_SQL = """
SELECT CAST(date_trunc($grain, e.received_at) AS DATE) AS period,
       CASE $breakdown WHEN 'status' THEN n.status WHEN 'identifier_kind' THEN n.kind END AS key,
       count(*) AS value
FROM identity_nodes AS n
JOIN identity_event_nodes AS en ON en.node_id = n.node_id
JOIN events AS e ON e.event_id = en.event_id
WHERE n.status IN ('blocked', 'capped')
  AND e.received_at >= $start AND e.received_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""


def blocked_values_hit(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Events carrying an identifier identity blocks (value, pattern or automatic cap)."""
    return Query(_BLOCKED_SQL, metric_params(start, end, grain, breakdown, BLOCKED_BREAKDOWNS))


def merge_rate(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Profile merges identity published, per period."""
    params = metric_params(start, end, grain, breakdown, ())
    del params["breakdown"]  # no breakdown is offered; the statement has no marker for it
    return Query(_MERGES_SQL, params)


def identifiers_per_profile(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Live identifiers per live profile now (per kind with the breakdown)."""
    return Query(
        _PER_PROFILE_SQL, metric_params(start, end, grain, breakdown, ("identifier_kind",))
    )


METRICS: tuple[Metric, ...] = (
    Metric(
        name="merge_rate",
        title="Profile merges",
        unit="merges",
        store="warehouse",
        package="identity",
        description="Merges of two profiles into one published by identity resolution, per "
        "period (splits from unmerges are not counted).",
        build=merge_rate,
    ),
    Metric(
        name="identifiers_per_profile",
        title="Identifiers per profile",
        unit="identifiers",
        store="warehouse",
        package="identity",
        description="Identifiers attached to a live profile divided by live profiles, as of "
        "today (earlier days from the daily snapshots); by kind with the breakdown.",
        build=identifiers_per_profile,
        breakdowns=("identifier_kind",),
        aggregation="last",
        now_only=True,
        integer=False,
    ),
    Metric(
        name="blocked_values_hit",
        title="Blocked values hit",
        unit="identifiers",
        store="warehouse",
        package="identity",
        description="Identifiers in received events that identity blocks: a blocked value or "
        "pattern (`blocked`) or an identifier over the automatic cap (`capped`), by the day "
        "the event was received; the status is today's.",
        build=blocked_values_hit,
        breakdowns=BLOCKED_BREAKDOWNS,
    ),
)
