"""SQL of the dashboards: the data-health metrics and the KPI snapshot table.

Warehouse statements are `Query` objects with `$name` parameters; operational ones are
SQLAlchemy Core selects over tables owned by `cdp` (job runs). Every metric statement answers
`period`, `key`, `value`. Column names come from the per-metric mappings below, never from
request data.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Date, Select, String, cast, func, null, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from cdp.scheduler import JobRun
from cdp.warehouse import Query
from dashboards.metrics import Breakdown, Grain


def _bounds(start: date, end: date) -> dict[str, object]:
    """Naive UTC datetimes for `[start, end + 1 day)`; warehouse timestamps hold UTC."""
    return {
        "start": datetime.combine(start, time()),
        "end_excl": datetime.combine(end + timedelta(days=1), time()),
    }


# The breakdown reaches SQL as a bound parameter selecting one of the CASE arms written below,
# so no statement text depends on the request. The tuples list what each statement offers.
EVENT_BREAKDOWNS: tuple[Breakdown, ...] = ("source", "event_type")
BATCH_BREAKDOWNS: tuple[Breakdown, ...] = ("source", "channel")
IDENTIFIER_BREAKDOWNS: tuple[Breakdown, ...] = ("identifier_kind", "source")

_EVENTS_SQL = """
SELECT CAST(date_trunc($grain, received_at) AS DATE) AS period,
       CASE $breakdown WHEN 'source' THEN source_id WHEN 'event_type' THEN type END AS key,
       count(*) AS value
FROM events
WHERE received_at >= $start AND received_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""

# The same counts by the events' own time: the history a data set describes, whenever it was
# loaded (an import of two years of orders fills two years here, and one day of
# `events_received`).
_EVENTS_OCCURRED_SQL = """
SELECT CAST(date_trunc($grain, timestamp) AS DATE) AS period,
       CASE $breakdown WHEN 'source' THEN source_id WHEN 'event_type' THEN type END AS key,
       count(*) AS value
FROM events
WHERE timestamp >= $start AND timestamp < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""

_BATCHES_SQL = """
SELECT CAST(date_trunc($grain, committed_at) AS DATE) AS period,
       CASE $breakdown WHEN 'source' THEN source_id WHEN 'channel' THEN channel END AS key,
       count(*) AS value
FROM ingest_batches
WHERE committed_at >= $start AND committed_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""

_IDENTIFIERS_SQL = """
SELECT CAST(date_trunc($grain, e.received_at) AS DATE) AS period,
       CASE $breakdown WHEN 'identifier_kind' THEN i.kind WHEN 'source' THEN e.source_id END
         AS key,
       count(*) AS value
FROM event_identifiers AS i
JOIN events AS e ON e.event_id = i.event_id
WHERE e.received_at >= $start AND e.received_at < $end_excl
GROUP BY 1, 2
ORDER BY 1, 2
"""


def _params(
    start: date, end: date, grain: Grain, breakdown: Breakdown | None, offered: tuple[str, ...]
) -> dict[str, object]:
    if breakdown is not None and breakdown not in offered:
        raise ValueError(f"breakdown {breakdown} is not offered here")
    return {"grain": grain, "breakdown": breakdown, **_bounds(start, end)}


def metric_params(
    start: date, end: date, grain: Grain, breakdown: Breakdown | None, offered: tuple[str, ...]
) -> dict[str, object]:
    """`grain`, `breakdown`, `start`, `end_excl` for a warehouse metric statement."""
    return _params(start, end, grain, breakdown, offered)


def events_received(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Query:
    """Events received per period, by the day the platform received them."""
    return Query(_EVENTS_SQL, _params(start, end, grain, breakdown, EVENT_BREAKDOWNS))


def events_occurred(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Query:
    """Events per period of their own timestamp (when they happened)."""
    return Query(_EVENTS_OCCURRED_SQL, _params(start, end, grain, breakdown, EVENT_BREAKDOWNS))


def ingest_batches(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Query:
    """Load batches committed per period."""
    return Query(_BATCHES_SQL, _params(start, end, grain, breakdown, BATCH_BREAKDOWNS))


def identifiers_seen(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Query:
    """Identifiers extracted from the events received in each period."""
    return Query(_IDENTIFIERS_SQL, _params(start, end, grain, breakdown, IDENTIFIER_BREAKDOWNS))


class _PeriodStart(FunctionElement[date]):
    """First UTC day of the period holding a timestamp (one subclass per grain)."""

    type = Date()
    inherit_cache = True
    grain: Grain = "day"


class day_start(_PeriodStart):
    """The UTC day of a timestamp."""

    name = "day_start"
    inherit_cache = True
    grain: Grain = "day"


class week_start(_PeriodStart):
    """The Monday (UTC) of a timestamp's ISO week."""

    name = "week_start"
    inherit_cache = True
    grain: Grain = "week"


class month_start(_PeriodStart):
    """The first day (UTC) of a timestamp's month."""

    name = "month_start"
    inherit_cache = True
    grain: Grain = "month"


_SQLITE_MODIFIERS: dict[str, tuple[str, ...]] = {
    "day": (),
    "week": ("weekday 0", "-6 days"),
    "month": ("start of month",),
}


@compiles(_PeriodStart, "sqlite")
def _period_sqlite(element: _PeriodStart, compiler: Any, **kw: Any) -> str:  # Any: SA API
    # SQLite stores UTC timestamps as ISO text; date() with modifiers truncates them.
    args = [compiler.process(element.clauses, **kw)]
    args += [f"'{m}'" for m in _SQLITE_MODIFIERS[element.grain]]  # class constants
    return f"date({', '.join(args)})"


@compiles(_PeriodStart)
def _period_default(element: _PeriodStart, compiler: Any, **kw: Any) -> str:  # Any: SA API
    # The grain is the construct's own class constant, rendered inline so that the SELECT and
    # GROUP BY expressions are textually identical (PostgreSQL compares them as written).
    column = compiler.process(element.clauses, **kw)
    assert element.grain in _SQLITE_MODIFIERS
    return f"CAST(date_trunc('{element.grain}', timezone('UTC', {column})) AS DATE)"


PERIOD_START: dict[str, type[_PeriodStart]] = {
    "day": day_start,
    "week": week_start,
    "month": month_start,
}

JOB_BREAKDOWNS: dict[str, ColumnElement[str]] = {
    "job": JobRun.job,  # type: ignore[dict-item]
    "status": JobRun.status,  # type: ignore[dict-item]
}


def _job_runs(
    start: date, end: date, grain: Grain, breakdown: Breakdown | None, *, failed_only: bool
) -> Select[date, str, int]:
    period = PERIOD_START[grain](JobRun.started_at).label("period")
    key = (JOB_BREAKDOWNS[breakdown] if breakdown else cast(null(), String)).label("key")
    query = (
        select(period, key, func.count().label("value"))
        .where(JobRun.started_at >= datetime.combine(start, time(), tzinfo=UTC))
        .where(JobRun.started_at < datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC))
        .group_by(period, key)
        .order_by(period, key)
    )
    if failed_only:
        query = query.where(JobRun.status == "failed")
    return query


def job_runs(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Select[date, str, int]:
    """Job runs started per period."""
    return _job_runs(start, end, grain, breakdown, failed_only=False)


def job_failures(
    *,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
) -> Select[date, str, int]:
    """Job runs that failed, per period of their start."""
    return _job_runs(start, end, grain, breakdown, failed_only=True)


def snapshot_rows(*, metric: str, breakdown: Breakdown | None, start: date, end: date) -> Query:
    """Stored daily values of a metric for one breakdown (or none), days `start`..`end`."""
    return Query(
        """
        SELECT day AS period, key, value
        FROM kpi_snapshots
        WHERE metric = $metric AND breakdown = $breakdown AND program_id = ''
          AND day BETWEEN $start AND $end
        ORDER BY day, key
        """,
        {"metric": metric, "breakdown": breakdown or "", "start": start, "end": end},
    )


def stored_snapshots(*, metric: str, start: date, end: date) -> Query:
    """Every stored row of a metric (all breakdowns, all programmes) for days `start`..`end`."""
    return Query(
        """
        SELECT day, breakdown, key, value
        FROM kpi_snapshots
        WHERE metric = $metric AND program_id = '' AND day BETWEEN $start AND $end
        """,
        {"metric": metric, "start": start, "end": end},
    )


def delete_snapshot_days(*, metric: str, days: list[date]) -> Query:
    """Remove the stored values of a metric (all breakdowns) for the given days."""
    return Query(
        """
        DELETE FROM kpi_snapshots
        WHERE metric = $metric AND program_id = '' AND list_contains($days, day)
        """,
        {"metric": metric, "days": days},
    )


STAGED_SNAPSHOTS = "staged_snapshots"


def insert_snapshots() -> Query:
    """Copy the rows of the Arrow table registered as `staged_snapshots` into the snapshots."""
    return Query(
        """
        INSERT INTO kpi_snapshots (metric, day, breakdown, key, program_id, value, taken_at)
        SELECT metric, day, breakdown, key, program_id, value, taken_at FROM staged_snapshots
        """
    )
