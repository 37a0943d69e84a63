"""The standard dashboards, declared as widgets over the catalogue like custom ones.

A widget whose metric is not registered is left out of the page, and the page says which
package brings it (from `metrics.PLANNED`), so no number is ever invented.
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboards.schemas import Widget


@dataclass(frozen=True, slots=True)
class StandardDashboard:
    """A dashboard shipped with the platform."""

    slug: str
    title: str
    summary: str
    widgets: tuple[Widget, ...]
    program_selector: bool = False


STANDARD: tuple[StandardDashboard, ...] = (
    StandardDashboard(
        slug="data-health",
        title="Data health",
        summary="What arrives, from where, what it carries, and whether the jobs keep up.",
        widgets=(
            Widget(metric="events_received", chart="number"),
            Widget(metric="identifiers_seen", chart="number"),
            Widget(metric="ingest_batches", chart="number"),
            Widget(metric="job_failures", chart="number"),
            Widget(
                title="Events per source per day",
                metric="events_received",
                breakdown="source",
                chart="line",
            ),
            Widget(
                title="Events per day by event time",
                metric="events_occurred",
                breakdown="source",
                chart="line",
            ),
            Widget(
                title="Identifiers per kind per day",
                metric="identifiers_seen",
                breakdown="identifier_kind",
                chart="bar",
            ),
            Widget(
                title="Load batches per channel",
                metric="ingest_batches",
                breakdown="channel",
                chart="bar",
            ),
            Widget(title="Job runs by outcome", metric="job_runs", breakdown="status", chart="bar"),
            Widget(
                title="Job failures per week",
                metric="job_failures",
                breakdown="job",
                grain="week",
                chart="table",
            ),
            Widget(
                title="Events by type per week",
                metric="events_received",
                breakdown="event_type",
                grain="week",
                chart="table",
            ),
            Widget(metric="events_rejected", chart="number"),
            Widget(metric="duplicates_dropped", chart="number"),
            Widget(metric="identifiers_per_profile", chart="number"),
            Widget(title="Profile merges per day", metric="merge_rate", chart="line"),
            Widget(
                title="Rejected events per source",
                metric="events_rejected",
                breakdown="source",
                chart="bar",
            ),
            Widget(metric="blocked_values_hit", chart="number"),
            Widget(
                title="Blocked values hit, by reason",
                metric="blocked_values_hit",
                breakdown="status",
                chart="bar",
            ),
        ),
    ),
    StandardDashboard(
        slug="programme",
        title="Programme",
        summary="Member participation and the effect of the loyalty programme.",
        widgets=(
            Widget(metric="members", chart="number"),
            Widget(metric="active_members", chart="number"),
            Widget(metric="points_liability", chart="number"),
            Widget(metric="redemption_rate", chart="number"),
            Widget(title="Members over time", metric="members", chart="line"),
            Widget(title="Enrolments", metric="enrolments", chart="bar"),
            Widget(title="Points issued", metric="points_issued", chart="line"),
            Widget(title="Points redeemed", metric="points_redeemed", chart="line"),
            Widget(title="Points expired", metric="points_expired", chart="line"),
            Widget(title="Tier distribution", metric="tier_distribution", chart="bar"),
            Widget(title="Tier movements", metric="tier_movements", grain="week", chart="bar"),
            Widget(title="Top rewards", metric="top_rewards", grain="month", chart="table"),
            Widget(
                title="Members vs non-members",
                metric="member_vs_non_member",
                grain="month",
                chart="table",
            ),
        ),
        program_selector=True,
    ),
    StandardDashboard(
        slug="audiences",
        title="Audiences",
        summary="How each segment grows and churns, and how segments overlap.",
        widgets=(
            Widget(title="Segment size", metric="segment_size", chart="line"),
            Widget(title="Entries per refresh", metric="segment_entries", chart="bar"),
            Widget(title="Exits per refresh", metric="segment_exits", chart="bar"),
            Widget(title="Overlap of two segments", metric="segment_overlap", chart="table"),
        ),
    ),
)

BY_SLUG: dict[str, StandardDashboard] = {d.slug: d for d in STANDARD}
