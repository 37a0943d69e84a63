"""The metric catalogue: what a KPI is, which breakdowns and grains it takes, how it is queried.

A metric is a name plus a builder: a function of keyword-only, plain-typed arguments
(`start`, `end`, `grain`, `breakdown`, `program_id`) that returns either a warehouse
`cdp.warehouse.Query` or an operational SQLAlchemy Core `Select`. Whatever the store, the
statement answers three columns: `period` (the first day of the period, a DATE), `key` (the
breakdown value, NULL without a breakdown) and `value`. Values reach SQL as bound parameters;
the breakdown picks a column from a per-metric mapping written in code.

Other packages never import `dashboards` (the architecture forbids it); instead a module of
this package, listed in `METRIC_MODULES`, declares their metrics and may call their `service`
module to build the statement. Adding a metric is adding a `Metric` to such a module's
`METRICS` tuple; adding a package is adding its module to `METRIC_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Literal, Protocol, TypeAlias, get_args

from sqlalchemy import Select

from cdp.warehouse import Query

Store = Literal["warehouse", "operational"]
Grain = Literal["day", "week", "month"]
# The closed list of breakdown dimensions a metric may offer.
Breakdown = Literal[
    "source",
    "channel",
    "event_type",
    "identifier_kind",
    "job",
    "status",
    "program",
    "tier",
    "segment",
    "store",
    "category",
]
# How values of several days combine into one period: `sum` (counts), `last` (levels such as
# a balance or a segment size) or `distinct` (only SQL can combine them, e.g. active members).
Aggregation = Literal["sum", "last", "distinct"]

# Any: a metric's select may have any column types; it answers period, key, value.
AnySelect: TypeAlias = Select[*tuple[Any, ...]]

GRAINS: tuple[Grain, ...] = get_args(Grain)
BREAKDOWNS: tuple[Breakdown, ...] = get_args(Breakdown)


class MetricBuilder(Protocol):
    """Builds the statement of a metric for one request."""

    def __call__(
        self,
        *,
        start: date,
        end: date,
        grain: Grain,
        breakdown: Breakdown | None,
        program_id: str | None,
    ) -> Query | AnySelect:
        """The statement answering `period`, `key`, `value` for days `start`..`end` inclusive."""
        ...


class SegmentPairBuilder(Protocol):
    """Builds the statement of a metric about two chosen segments (their overlap)."""

    def __call__(
        self,
        *,
        start: date,
        end: date,
        grain: Grain,
        segment_a: str,
        segment_b: str,
    ) -> Query:
        """The statement answering `period`, `key`, `value` for the two segments."""
        ...


def pair_only(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """The `build` of a metric about two segments: it needs the pair (`pair_build`)."""
    raise TypeError("this metric needs two segments: it is built by its pair_build")


@dataclass(frozen=True, slots=True)
class Metric:
    """One KPI of the catalogue."""

    name: str
    title: str
    unit: str
    store: Store
    package: str
    description: str
    build: MetricBuilder
    breakdowns: tuple[Breakdown, ...] = ()
    grains: tuple[Grain, ...] = GRAINS
    aggregation: Aggregation = "sum"
    integer: bool = True
    program_scoped: bool = False
    snapshot: bool = True
    # A level known only now (today's period): the snapshot job stores it as the closed day's.
    now_only: bool = False
    # A metric always split along one dimension of its own (key never NULL): its name (the
    # CSV column), and its keys in display order when they are fixed (else ranked by value).
    split: str | None = None
    split_keys: tuple[str, ...] = ()
    # Metrics about two chosen segments are built by this instead of `build`.
    pair_build: SegmentPairBuilder | None = None


@dataclass(frozen=True, slots=True)
class PlannedMetric:
    """A KPI the issue asks for whose data arrives with another package."""

    name: str
    title: str
    package: str
    dashboard: str


@dataclass(slots=True)
class Catalogue:
    """The registered metrics, by name."""

    metrics: dict[str, Metric] = field(default_factory=dict)

    def register(self, *metrics: Metric) -> None:
        """Add metrics; a name may be registered once."""
        for metric in metrics:
            if metric.name in self.metrics:
                raise ValueError(f"metric {metric.name} is registered twice")
            bad = [b for b in metric.breakdowns if b not in BREAKDOWNS]
            if bad:
                raise ValueError(f"metric {metric.name} has unknown breakdowns {bad}")
            if not metric.grains or any(g not in GRAINS for g in metric.grains):
                raise ValueError(f"metric {metric.name} has invalid grains {metric.grains}")
            if metric.split is not None and metric.breakdowns:
                raise ValueError(f"metric {metric.name} is split by {metric.split}: no breakdowns")
            if metric.pair_build is not None and (metric.snapshot or metric.program_scoped):
                raise ValueError(f"metric {metric.name} on a segment pair cannot be snapshot")
            self.metrics[metric.name] = metric

    def find(self, name: str) -> Metric | None:
        """The metric of this name, or None."""
        return self.metrics.get(name)

    def all(self) -> list[Metric]:
        """Every metric, by package then name."""
        return sorted(self.metrics.values(), key=lambda m: (m.package, m.name))


# Modules declaring `METRICS: tuple[Metric, ...]`; one per package whose data has KPIs.
METRIC_MODULES: tuple[str, ...] = (
    "dashboards.kpis.data_health",
    "dashboards.kpis.ingestion",
    "dashboards.kpis.identity",
    "dashboards.kpis.segments",
    "dashboards.kpis.loyalty",
)


def load_catalogue(modules: Iterable[str] = METRIC_MODULES) -> Catalogue:
    """A catalogue of every metric the listed modules declare."""
    catalogue = Catalogue()
    for name in modules:
        module = importlib.import_module(name)
        catalogue.register(*module.METRICS)
    return catalogue


_CATALOGUE: list[Catalogue] = []


def catalogue() -> Catalogue:
    """The process-wide catalogue, loaded on first use."""
    if not _CATALOGUE:
        _CATALOGUE.append(load_catalogue())
    return _CATALOGUE[0]


# What the issue asks for beyond the data that exists today, and the package that brings it.
# A planned metric disappears from the notes as soon as a metric of the same name registers.
PLANNED: tuple[PlannedMetric, ...] = (
    PlannedMetric("members", "Members", "loyalty", "programme"),
    PlannedMetric("active_members", "Active members", "loyalty", "programme"),
    PlannedMetric("enrolments", "Enrolments", "loyalty", "programme"),
    PlannedMetric("points_issued", "Points issued", "loyalty", "programme"),
    PlannedMetric("points_redeemed", "Points redeemed", "loyalty", "programme"),
    PlannedMetric("points_expired", "Points expired", "loyalty", "programme"),
    PlannedMetric("points_liability", "Outstanding points liability", "loyalty", "programme"),
    PlannedMetric("redemption_rate", "Redemption rate", "loyalty", "programme"),
    PlannedMetric("tier_distribution", "Tier distribution", "loyalty", "programme"),
    PlannedMetric("tier_movements", "Tier movements", "loyalty", "programme"),
    PlannedMetric("top_rewards", "Top rewards", "loyalty", "programme"),
    PlannedMetric(
        "member_vs_non_member",
        "Members vs non-members (basket, frequency, spend)",
        "loyalty",
        "programme",
    ),
    PlannedMetric("segment_size", "Segment size over time", "segments", "audiences"),
    PlannedMetric("segment_entries", "Entries per refresh", "segments", "audiences"),
    PlannedMetric("segment_exits", "Exits per refresh", "segments", "audiences"),
    PlannedMetric("segment_overlap", "Overlap of two segments", "segments", "audiences"),
    PlannedMetric(
        "events_rejected", "Rejected events and error samples", "ingestion", "data-health"
    ),
    PlannedMetric("duplicates_dropped", "Duplicates dropped", "ingestion", "data-health"),
    PlannedMetric("identifiers_per_profile", "Identifiers per profile", "identity", "data-health"),
    PlannedMetric("merge_rate", "Merge rate", "identity", "data-health"),
    PlannedMetric("blocked_values_hit", "Blocked values hit", "identity", "data-health"),
)
