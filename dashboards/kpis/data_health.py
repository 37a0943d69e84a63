"""Data-health metrics over what the foundation writes: events, load batches, job runs."""

from __future__ import annotations

from dashboards import queries
from dashboards.metrics import Metric

METRICS: tuple[Metric, ...] = (
    Metric(
        name="events_received",
        title="Events received",
        unit="events",
        store="warehouse",
        package="ingestion",
        description="Events accepted into the warehouse, by the day they were received.",
        build=queries.events_received,
        breakdowns=queries.EVENT_BREAKDOWNS,
    ),
    Metric(
        name="events_occurred",
        title="Events by event time",
        unit="events",
        store="warehouse",
        package="ingestion",
        description="Events in the warehouse by the day they happened (their `timestamp`), "
        "whenever they were loaded.",
        build=queries.events_occurred,
        breakdowns=queries.EVENT_BREAKDOWNS,
    ),
    Metric(
        name="ingest_batches",
        title="Load batches",
        unit="batches",
        store="warehouse",
        package="ingestion",
        description="Load batches committed to the warehouse.",
        build=queries.ingest_batches,
        breakdowns=queries.BATCH_BREAKDOWNS,
    ),
    Metric(
        name="identifiers_seen",
        title="Identifiers extracted",
        unit="identifiers",
        store="warehouse",
        package="ingestion",
        description="Normalised identifiers extracted from the events received.",
        build=queries.identifiers_seen,
        breakdowns=queries.IDENTIFIER_BREAKDOWNS,
    ),
    Metric(
        name="job_runs",
        title="Job runs",
        unit="runs",
        store="operational",
        package="cdp",
        description="Background job runs, scheduled, manual or from the CLI, by start day.",
        build=queries.job_runs,
        breakdowns=("job", "status"),
    ),
    Metric(
        name="job_failures",
        title="Job failures",
        unit="runs",
        store="operational",
        package="cdp",
        description="Background job runs that ended in failure, by start day.",
        build=queries.job_failures,
        breakdowns=("job",),
    ),
)
