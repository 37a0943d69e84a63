"""Segment metrics: sizes over time, entries and exits, from segments' refresh log."""

from __future__ import annotations

from datetime import date

from cdp.warehouse import Query, with_ctes
from dashboards.metrics import Breakdown, Grain, Metric, pair_only
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


OVERLAP_KEYS = ("in both", "only in the first", "only in the second")

# Membership of the two segments over time from their published entries and exits: after each
# event of a profile, where it stands (in both, only one, neither); each change of standing
# moves one profile between counts, so a day's counts are the running sum of the changes made
# up to the end of that day.
_OVERLAP_STEPS = (
    (
        "pair_events",
        """
        SELECT profile_id, occurred_at, seq,
               CASE WHEN segment_id = $segment_a THEN kind = 'entry' END AS a_event,
               CASE WHEN segment_id = $segment_b THEN kind = 'entry' END AS b_event
        FROM segment_events
        WHERE segment_id IN ($segment_a, $segment_b) AND occurred_at < $end_excl
        """,
    ),
    (
        "standings",
        """
        SELECT profile_id, occurred_at, seq,
               coalesce(last_value(a_event IGNORE NULLS) OVER w, false) AS in_a,
               coalesce(last_value(b_event IGNORE NULLS) OVER w, false) AS in_b
        FROM pair_events
        WINDOW w AS (PARTITION BY profile_id ORDER BY occurred_at, seq
                     ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        """,
    ),
    (
        "labelled",
        """
        SELECT profile_id, occurred_at, seq,
               CASE WHEN in_a AND in_b THEN 'in both'
                    WHEN in_a THEN 'only in the first'
                    WHEN in_b THEN 'only in the second' END AS standing
        FROM standings
        """,
    ),
    (
        "changes",
        """
        SELECT CAST(occurred_at AS DATE) AS day, standing AS standing_new,
               lag(standing) OVER (PARTITION BY profile_id ORDER BY occurred_at, seq)
                 AS standing_old
        FROM labelled
        """,
    ),
    (
        "moves",
        """
        SELECT day, standing_new AS standing, 1 AS delta FROM changes
        WHERE standing_new IS NOT NULL AND standing_new IS DISTINCT FROM standing_old
        UNION ALL
        SELECT day, standing_old, -1 FROM changes
        WHERE standing_old IS NOT NULL AND standing_new IS DISTINCT FROM standing_old
        """,
    ),
    (
        "daily",
        "SELECT day, standing, sum(delta) AS delta FROM moves GROUP BY 1, 2",
    ),
    (
        "grid",
        """
        SELECT CAST(d AS DATE) AS day, standing
        FROM generate_series(CAST($start AS DATE), CAST($end AS DATE), INTERVAL 1 DAY) AS t(d),
             (VALUES ('in both'), ('only in the first'), ('only in the second')) AS s(standing)
        """,
    ),
)
_OVERLAP_FINAL = """
SELECT g.day AS period, g.standing AS key, coalesce(sum(d.delta), 0) AS value
FROM grid AS g
LEFT JOIN daily AS d ON d.standing = g.standing AND d.day <= g.day
GROUP BY 1, 2
ORDER BY 1, 2
"""


def segment_overlap(
    *, start: date, end: date, grain: Grain, segment_a: str, segment_b: str
) -> Query:
    """Profiles in both segments, only in the first, only in the second, at each day's end."""
    params = metric_params(start, end, "day", None, ())
    del params["grain"], params["breakdown"]
    return Query(
        with_ctes(_OVERLAP_STEPS, _OVERLAP_FINAL),
        {**params, "end": end, "segment_a": segment_a, "segment_b": segment_b},
    )


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
    Metric(
        name="segment_overlap",
        title="Overlap of two segments",
        unit="profiles",
        store="warehouse",
        package="segments",
        description="Profiles in both of two chosen segments (`segment_a`, `segment_b`), only "
        "in the first and only in the second, at the end of each day, from the segments' "
        "published entries and exits.",
        build=pair_only,
        pair_build=segment_overlap,
        aggregation="last",
        snapshot=False,
        split="standing",
        split_keys=OVERLAP_KEYS,
    ),
)
