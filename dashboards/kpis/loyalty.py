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
