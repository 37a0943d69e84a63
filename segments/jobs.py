"""Scheduled jobs of the segments package: attribute refresh and due segment refreshes."""

from __future__ import annotations

from cdp.scheduler import JobContext, JobSpec
from segments import service


def refresh_attributes(context: JobContext) -> int:
    """Recompute attributes when profiles, definitions or the day changed; then the event map
    and the catalogue."""
    settings = context.settings.segments
    with context.db.begin() as session:
        result = service.refresh_derived(
            session, context.warehouse, settings=settings, only_if_stale=True
        )
    if result.skipped:
        context.message = "unchanged since the last refresh"
        return 0
    context.message = (
        f"{result.attributes} attributes of {result.profiles} profiles in {result.seconds:.2f}s"
    )
    return result.profiles


def refresh_attributes_now(context: JobContext) -> int:
    """Recompute every attribute, the event map, the field catalogue and the stored property
    values now."""
    settings = context.settings.segments
    with context.db.begin() as session:
        result = service.refresh_derived(session, context.warehouse, settings=settings)
    context.message = (
        f"{result.attributes} attributes of {result.profiles} profiles in {result.seconds:.2f}s"
    )
    return result.profiles


def refresh_segments(context: JobContext) -> int:
    """Refresh every segment whose own refresh period has passed."""
    done = service.refresh_due_segments(
        context.db, context.warehouse, settings=context.settings.segments
    )
    context.message = f"{len(done)} segments refreshed, " + ", ".join(
        f"{r.segment_id}: {r.size} (+{r.entries} -{r.exits})" for r in done
    )
    return sum(r.entries + r.exits for r in done)


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="segments.attributes",
        func=refresh_attributes,
        description="Recompute computed attributes after identity changed profiles",
        trigger="interval",
        trigger_args={"minutes": 5},
    ),
    JobSpec(
        name="segments.attributes.full",
        func=refresh_attributes_now,
        description="Recompute every computed attribute and the field catalogue now",
    ),
    JobSpec(
        name="segments.refresh",
        func=refresh_segments,
        description="Refresh the segments whose refresh period has passed",
        trigger="interval",
        trigger_args={"minutes": 1},
    ),
)
