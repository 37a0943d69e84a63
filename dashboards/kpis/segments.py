"""Segment metrics: sizes over time, entries and exits, from segments' refresh log."""

from __future__ import annotations

from datetime import date

from cdp.warehouse import Query
from dashboards.metrics import Breakdown, Grain, Metric
from dashboards.queries import metric_params

BREAKDOWNS: tuple[Breakdown, ...] = ("segment",)

# The size of a segment on a day is the size after its last refresh that day. Without the
# breakdown, the sizes of the segments refreshed that day are added up.
_SIZE_SQL = """
SELECT CAST(date_trunc($grain, day) AS DATE) AS period,
       CASE $breakdown WHEN 'segment' THEN segment_id END AS key,
       sum(size) AS value
FROM (
    SELECT CAST(refreshed_at AS DATE) AS day, segment_id, arg_max(size, refreshed_at) AS size
    FROM segment_refreshes
    WHERE refreshed_at >= $start AND refreshed_at < $end_excl
    GROUP BY 1, 2
) AS daily
GROUP BY 1, 2
ORDER BY 1, 2
"""

_FLOW_SQL = """
SELECT CAST(date_trunc($grain, refreshed_at) AS DATE) AS period,
       CASE $breakdown WHEN 'segment' THEN segment_id END AS key,
       sum(CASE $flow WHEN 'entries' THEN entries ELSE exits END) AS value
FROM segment_refreshes
WHERE refreshed_at >= $start AND refreshed_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""


def segment_size(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Size of each segment after its last refresh of the day."""
    return Query(_SIZE_SQL, metric_params(start, end, grain, breakdown, BREAKDOWNS))


def segment_entries(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Profiles that entered segments at refreshes in each period."""
    params = metric_params(start, end, grain, breakdown, BREAKDOWNS)
    return Query(_FLOW_SQL, {**params, "flow": "entries"})


def segment_exits(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Profiles that left segments at refreshes in each period."""
    params = metric_params(start, end, grain, breakdown, BREAKDOWNS)
    return Query(_FLOW_SQL, {**params, "flow": "exits"})


METRICS: tuple[Metric, ...] = (
    Metric(
        name="segment_size",
        title="Segment size",
        unit="profiles",
        store="warehouse",
        package="segments",
        description="Profiles in a segment after its last refresh of the day (key: segment "
        "id); without the breakdown, the sum over the segments refreshed that day.",
        build=segment_size,
        breakdowns=BREAKDOWNS,
        aggregation="last",
    ),
    Metric(
        name="segment_entries",
        title="Segment entries",
        unit="profiles",
        store="warehouse",
        package="segments",
        description="Profiles entering segments at refreshes (key: segment id).",
        build=segment_entries,
        breakdowns=BREAKDOWNS,
    ),
    Metric(
        name="segment_exits",
        title="Segment exits",
        unit="profiles",
        store="warehouse",
        package="segments",
        description="Profiles leaving segments at refreshes (key: segment id).",
        build=segment_exits,
        breakdowns=BREAKDOWNS,
    ),
)
