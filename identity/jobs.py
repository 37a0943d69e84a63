"""Scheduled jobs of the identity package: incremental resolution and the full rebuild."""

from __future__ import annotations

from cdp.scheduler import JobContext, JobSpec
from identity import service


def resolve_new_events(context: JobContext) -> int:
    """Resolve the events ingested since the last run; returns how many.

    A run that found nothing to do leaves no message, so the runner drops its record: the job
    polls every 5 seconds and would otherwise add a run to `cdp_job_run` each time.
    """
    with context.db.begin() as session:
        rules = service.get_rules(session)
    result = service.resolve(context.warehouse, settings=context.settings, rules=rules)
    if result.mode == "incremental" and not (result.events or result.affected_identifiers):
        return 0
    context.message = (
        f"{result.mode}: {result.events} events, {result.new_profiles} new profiles,"
        f" {result.merges} merges, {result.splits} splits, up to event {result.up_to_event_id}"
    )
    return result.events


def rebuild(context: JobContext) -> int:
    """Recompute every profile from all links (ids kept, changes published)."""
    with context.db.begin() as session:
        rules = service.get_rules(session)
    result = service.resolve(context.warehouse, settings=context.settings, rules=rules, full=True)
    context.message = (
        f"full: {result.affected_identifiers} identifiers, {result.merges} merges,"
        f" {result.splits} splits, {result.new_profiles} new profiles"
    )
    return result.affected_identifiers


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="identity.resolve",
        func=resolve_new_events,
        description="Resolve newly ingested events into profiles (incremental)",
        trigger="interval",
        trigger_args={"seconds": 5},
    ),
    JobSpec(
        name="identity.rebuild",
        func=rebuild,
        description="Rebuild every profile from the whole identifier graph",
    ),
)
