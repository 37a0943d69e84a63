"""Scheduled jobs of the dashboards package."""

from __future__ import annotations

from cdp.scheduler import JobContext, JobSpec
from dashboards import service


def snapshot_kpis(context: JobContext) -> int:
    """Store the daily value of every metric for the closed days not yet stored."""
    with context.db.begin() as session:
        rows = service.take_snapshots(session, warehouse=context.warehouse)
    context.message = f"{rows} snapshot rows written"
    return rows


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="dashboards.kpi_snapshots",
        func=snapshot_kpis,
        description="Store each KPI's daily values so history outlives raw data",
        trigger="cron",
        trigger_args={"hour": 0, "minute": 20},
    ),
)
