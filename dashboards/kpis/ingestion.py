"""Ingestion metrics: rejected events and duplicates dropped, from ingestion's load tables."""

from __future__ import annotations

from datetime import date

from cdp.warehouse import Query
from dashboards.metrics import Breakdown, Grain, Metric
from dashboards.queries import metric_params

BREAKDOWNS: tuple[Breakdown, ...] = ("source", "channel")

_REJECTED_SQL = """
SELECT CAST(date_trunc($grain, rejected_at) AS DATE) AS period,
       CASE $breakdown WHEN 'source' THEN source_id WHEN 'channel' THEN channel END AS key,
       count(*) AS value
FROM ingest_rejections
WHERE rejected_at >= $start AND rejected_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""

_DUPLICATES_SQL = """
SELECT CAST(date_trunc($grain, b.committed_at) AS DATE) AS period,
       CASE $breakdown WHEN 'source' THEN b.source_id WHEN 'channel' THEN b.channel END AS key,
       sum(s.duplicates) AS value
FROM ingest_batch_stats AS s
JOIN ingest_batches AS b ON b.batch_id = s.batch_id
WHERE b.committed_at >= $start AND b.committed_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""


def events_rejected(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Messages and rows refused by validation, per period of their rejection."""
    return Query(_REJECTED_SQL, metric_params(start, end, grain, breakdown, BREAKDOWNS))


def duplicates_dropped(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Messages dropped as duplicates (message id seen before), per period of their load."""
    return Query(_DUPLICATES_SQL, metric_params(start, end, grain, breakdown, BREAKDOWNS))


METRICS: tuple[Metric, ...] = (
    Metric(
        name="events_rejected",
        title="Rejected events",
        unit="events",
        store="warehouse",
        package="ingestion",
        description="Messages and file rows refused by validation (reasons in ingestion's "
        "rejection log), by the day they were rejected.",
        build=events_rejected,
        breakdowns=BREAKDOWNS,
    ),
    Metric(
        name="duplicates_dropped",
        title="Duplicates dropped",
        unit="events",
        store="warehouse",
        package="ingestion",
        description="Messages whose message id had already been loaded, by load day.",
        build=duplicates_dropped,
        breakdowns=BREAKDOWNS,
    ),
)
