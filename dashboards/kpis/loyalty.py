"""Loyalty programme metrics: points flows and enrolments, from loyalty's ledger and members."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select

from dashboards.metrics import Breakdown, Grain, Metric
from dashboards.queries import PERIOD_START
from loyalty import service as loyalty_service


def _window(start: date, end: date) -> tuple[datetime, datetime]:
    return (
        datetime.combine(start, time(), tzinfo=UTC),
        datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC),
    )


def _flow(flow: str) -> Any:  # Any: a MetricBuilder
    def build(
        *,
        start: date,
        end: date,
        grain: Grain,
        breakdown: Breakdown | None,
        program_id: str | None,
    ) -> Select[Any]:  # Any: period, key, value
        first, end_excl = _window(start, end)
        return loyalty_service.points_flow_select(
            flow=flow,
            start=first,
            end_excl=end_excl,
            period=PERIOD_START[grain],
            program_id=program_id,
            by_program=breakdown == "program",
        )

    build.__doc__ = f"Points {flow} per period."
    return build


def enrolments(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[Any]:  # Any: period, key, value
    """New memberships per period of enrolment."""
    first, end_excl = _window(start, end)
    return loyalty_service.enrolments_select(
        start=first,
        end_excl=end_excl,
        period=PERIOD_START[grain],
        program_id=program_id,
        by_program=breakdown == "program",
    )


def _flow_builder(select_of: Any) -> Any:  # Any: a loyalty service select builder
    def build(
        *,
        start: date,
        end: date,
        grain: Grain,
        breakdown: Breakdown | None,
        program_id: str | None,
    ) -> Select[Any]:  # Any: period, key, value
        first, end_excl = _window(start, end)
        return select_of(  # type: ignore[no-any-return]
            start=first,
            end_excl=end_excl,
            period=PERIOD_START[grain],
            program_id=program_id,
            by_program=breakdown == "program",
        )

    return build


def _today_period(start: date, end: date, grain: Grain) -> date | None:
    """Today's period at the grain, when the range includes today; levels are known only now."""
    today = datetime.now(UTC).date()
    if not start <= today <= end:
        return None
    if grain == "week":
        return today - timedelta(days=today.weekday())
    if grain == "month":
        return today.replace(day=1)
    return today


def members(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[date, str, int]:
    """Memberships now (not merged away), on today's period."""
    return loyalty_service.members_now_select(
        period_value=_today_period(start, end, grain), program_id=program_id, breakdown=breakdown
    )


def points_liability(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[date, str, int]:
    """Outstanding points valued at the programme's point value, now."""
    return loyalty_service.liability_now_select(
        period_value=_today_period(start, end, grain),
        now=datetime.now(UTC),
        program_id=program_id,
        by_program=breakdown == "program",
    )


def tier_distribution(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[date, str, int]:
    """Active members by tier now."""
    return loyalty_service.tier_distribution_select(
        period_value=_today_period(start, end, grain),
        program_id=program_id,
        by_tier=breakdown == "tier",
    )


def _points(name: str, title: str, flow: str, description: str) -> Metric:
    return Metric(
        name=name,
        title=title,
        unit="points",
        store="operational",
        package="loyalty",
        description=description,
        build=_flow(flow),
        breakdowns=("program",),
        program_scoped=True,
    )


METRICS: tuple[Metric, ...] = (
    _points(
        "points_issued",
        "Points issued",
        "issued",
        "Points earned, imported and given as bonuses, plus positive manual adjustments.",
    ),
    _points(
        "points_redeemed",
        "Points redeemed",
        "redeemed",
        "Points spent on rewards, net of cancelled redemptions.",
    ),
    _points("points_expired", "Points expired", "expired", "Points removed by expiry."),
    Metric(
        name="active_members",
        title="Active members",
        unit="members",
        store="operational",
        package="loyalty",
        description="Distinct members who earned or redeemed in the period.",
        build=_flow_builder(loyalty_service.active_members_select),
        breakdowns=("program",),
        aggregation="distinct",
        program_scoped=True,
    ),
    Metric(
        name="redemption_rate",
        title="Redemption rate",
        unit="ratio",
        store="operational",
        package="loyalty",
        description="Points redeemed divided by points issued in the period (no value when "
        "nothing was issued).",
        build=_flow_builder(loyalty_service.redemption_rate_select),
        breakdowns=("program",),
        aggregation="distinct",
        integer=False,
        program_scoped=True,
    ),
    Metric(
        name="members",
        title="Members",
        unit="members",
        store="operational",
        package="loyalty",
        description="Memberships not merged away, as of today (earlier days from the daily "
        "snapshots).",
        build=members,
        breakdowns=("program", "status"),
        aggregation="last",
        program_scoped=True,
    ),
    Metric(
        name="points_liability",
        title="Outstanding points liability",
        unit="currency",
        store="operational",
        package="loyalty",
        description="Unexpired points left (pending included) times the programme's point "
        "value, as of today.",
        build=points_liability,
        breakdowns=("program",),
        aggregation="last",
        integer=False,
        program_scoped=True,
    ),
    Metric(
        name="tier_distribution",
        title="Tier distribution",
        unit="members",
        store="operational",
        package="loyalty",
        description="Active members per tier (`none` without a tier), as of today.",
        build=tier_distribution,
        breakdowns=("tier",),
        aggregation="last",
        program_scoped=True,
    ),
    Metric(
        name="enrolments",
        title="Enrolments",
        unit="members",
        store="operational",
        package="loyalty",
        description="Memberships by enrolment day (a membership merged into another by an "
        "identity merge is not counted).",
        build=enrolments,
        breakdowns=("program",),
        program_scoped=True,
    ),
)
