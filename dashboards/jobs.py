"""Scheduled jobs of the dashboards package."""

from __future__ import annotations

from cdp.scheduler import JobContext, JobSpec
from dashboards import order_facts, service


def refresh_order_facts(context: JobContext) -> int:
    """Append the orders received since the last run to the order facts."""
    rows = order_facts.refresh(context.warehouse)
    context.message = f"{rows} orders appended"
    return rows


def snapshot_kpis(context: JobContext) -> int:
    """Store the daily value of every metric for the closed days not yet stored."""
    with context.db.begin() as session:
        rows = service.take_snapshots(session, warehouse=context.warehouse)
    context.message = f"{rows} snapshot rows written"
    return rows


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="dashboards.order_facts",
        func=refresh_order_facts,
        description="Parse the amounts of new orders once for the members vs non-members KPI",
        trigger="interval",
        trigger_args={"minutes": 10},
    ),
    JobSpec(
        name="dashboards.kpi_snapshots",
        func=snapshot_kpis,
        description="Store each KPI's daily values so history outlives raw data",
        trigger="cron",
        trigger_args={"hour": 0, "minute": 20},
    ),
)
