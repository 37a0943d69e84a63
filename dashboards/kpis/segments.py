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

# Membership of the two segments over time from their published entries and exits. A
# segment's size at a day's end is the running sum of its entries (+1) and exits (-1) up to
# then. A profile's standing in a segment is the running count of its own entries and exits
# there (the log alternates them): one window pass gives, after each event, whether the
# profile stands in both, and (minus the event's own step) whether it did before; each change
# moves it in or out of "in both". Only in the first = size of the first - in both, and so on:
# running sums of small per-day tables, no per-day join of memberships. Profiles are keyed by
# the 64-bit hash of their id (integer sorting; a collision between two profiles of the pair
# has a probability of about n^2 / 2^65, 3e-8 for a million profiles).
_OVERLAP_STEPS = (
    (
        "pair_log",
        """
        SELECT segment_id = $segment_a AS is_a, hash(profile_id) AS profile_key, kind,
               occurred_at, seq,
               CAST(occurred_at AS DATE) AS day
        FROM segment_events
        WHERE segment_id IN ($segment_a, $segment_b) AND occurred_at < $end_excl
        """,
    ),
    (
        "sizes",
        """
        SELECT day,
               sum(CASE WHEN is_a THEN CASE kind WHEN 'entry' THEN 1 ELSE -1 END ELSE 0 END)
                 AS a_delta,
               sum(CASE WHEN NOT is_a THEN CASE kind WHEN 'entry' THEN 1 ELSE -1 END ELSE 0 END)
                 AS b_delta
        FROM pair_log
        GROUP BY day
        """,
    ),
    (
        "standings",
        """
        SELECT day, a_now > 0 AND b_now > 0 AS both_after,
               a_now - a_step > 0 AND b_now - b_step > 0 AS both_before
        FROM (
            SELECT day, a_step, b_step,
                   sum(a_step) OVER upto AS a_now, sum(b_step) OVER upto AS b_now
            FROM (
                SELECT l.profile_key, l.occurred_at, l.seq, l.day,
                       CASE WHEN NOT l.is_a THEN 0 WHEN l.kind = 'entry' THEN 1 ELSE -1 END
                         AS a_step,
                       CASE WHEN l.is_a THEN 0 WHEN l.kind = 'entry' THEN 1 ELSE -1 END
                         AS b_step
                FROM pair_log AS l
            ) AS steps
            WINDOW upto AS (PARTITION BY profile_key ORDER BY occurred_at, seq
                            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        ) AS counted
        """,
    ),
    (
        "both_moves",
        """
        SELECT day, sum(CASE WHEN both_after THEN 1 ELSE -1 END) AS both_delta
        FROM standings
        WHERE both_after <> both_before
        GROUP BY day
        """,
    ),
    (
        "running",
        """
        SELECT CAST(d AS DATE) AS day,
               (SELECT coalesce(sum(a_delta), 0) FROM sizes WHERE sizes.day <= CAST(d AS DATE))
                 AS a_size,
               (SELECT coalesce(sum(b_delta), 0) FROM sizes WHERE sizes.day <= CAST(d AS DATE))
                 AS b_size,
               (SELECT coalesce(sum(both_delta), 0) FROM both_moves
                WHERE both_moves.day <= CAST(d AS DATE)) AS both_size
        FROM generate_series(CAST($start AS DATE), CAST($end AS DATE), INTERVAL 1 DAY) AS t(d)
        """,
    ),
)
_OVERLAP_FINAL = """
SELECT day AS period, 'in both' AS key, both_size AS value FROM running
UNION ALL
SELECT day, 'only in the first', a_size - both_size FROM running
UNION ALL
SELECT day, 'only in the second', b_size - both_size FROM running
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
