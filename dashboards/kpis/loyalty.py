"""Loyalty programme metrics: points flows and enrolments, from loyalty's ledger and members."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select

from cdp.warehouse import Query, with_ctes
from dashboards import order_facts
from dashboards.metrics import Breakdown, Grain, Metric
from dashboards.queries import PERIOD_START, metric_params
from identity import service as identity_service
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


def tier_movements(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[Any]:  # Any: period, key, value
    """Tier upgrades and downgrades per period, from the tier history."""
    first, end_excl = _window(start, end)
    return loyalty_service.tier_movements_select(
        start=first, end_excl=end_excl, period=PERIOD_START[grain], program_id=program_id
    )


def top_rewards(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Select[Any]:  # Any: period, key, value
    """Redemptions per reward per period (cancelled ones excluded)."""
    first, end_excl = _window(start, end)
    return loyalty_service.reward_redemptions_select(
        start=first, end_excl=end_excl, period=PERIOD_START[grain], program_id=program_id
    )


MEMBER_GROUPS = ("members", "non-members")
MEMBER_MEASURES = ("average basket", "purchases per customer", "spend per customer")
MEMBER_KEYS = tuple(f"{g}: {m}" for m in MEMBER_MEASURES for g in MEMBER_GROUPS)

# A profile is a member for an order when it holds a membership (of the programme, or of any)
# enrolled at or before the order; loyalty publishes memberships in its member snapshot.
_MEMBERSHIPS_SQL = """
SELECT profile_id, min(enrolled_at) AS enrolled_at
FROM loyalty_member_snapshot
WHERE $program_id IS NULL OR program_id = $program_id
GROUP BY profile_id
"""
_GROUPS_SQL = """
SELECT CAST(date_trunc($grain, o.at) AS DATE) AS period,
       CASE WHEN m.enrolled_at <= o.at THEN 'members' ELSE 'non-members' END AS grp,
       count(*) AS orders, sum(o.amount) AS spend, count(DISTINCT ep.profile_id) AS buyers
FROM scoped_events AS o
JOIN event_profiles AS ep ON ep.event_id = o.event_id
LEFT JOIN memberships AS m ON m.profile_id = ep.profile_id
GROUP BY 1, 2
"""
_MEMBER_VS_NON_MEMBER_FINAL = """
SELECT period, grp || ': average basket' AS key, spend / orders AS value FROM groups
UNION ALL
SELECT period, grp || ': purchases per customer', orders / buyers FROM groups
UNION ALL
SELECT period, grp || ': spend per customer', spend / buyers FROM groups
ORDER BY 1, 2
"""


def member_vs_non_member(
    *, start: date, end: date, grain: Grain, breakdown: Breakdown | None, program_id: str | None
) -> Query:
    """Average basket, purchases and spend per customer of members and of non-members."""
    params = metric_params(start, end, grain, breakdown, ())
    del params["breakdown"]
    sql = with_ctes(
        [
            ("scoped_events", order_facts.ORDERS_SQL),
            ("event_profiles", identity_service.scoped_event_profile_sql()),
            ("memberships", _MEMBERSHIPS_SQL),
            ("groups", _GROUPS_SQL),
        ],
        _MEMBER_VS_NON_MEMBER_FINAL,
    )
    return Query(sql, {**params, "program_id": program_id})


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
        now_only=True,
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
        now_only=True,
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
        now_only=True,
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
    Metric(
        name="tier_movements",
        title="Tier movements",
        unit="members",
        store="operational",
        package="loyalty",
        description="Tier changes per period from the tier history: `upgrades` (to a higher "
        "rank) and `downgrades`.",
        build=tier_movements,
        program_scoped=True,
        split="direction",
        split_keys=loyalty_service.TIER_DIRECTIONS,
    ),
    Metric(
        name="top_rewards",
        title="Top rewards",
        unit="redemptions",
        store="operational",
        package="loyalty",
        description="Redemptions per reward (by name), cancelled ones excluded; rewards "
        "ranked by redemptions over the range.",
        build=top_rewards,
        program_scoped=True,
        split="reward",
    ),
    Metric(
        name="member_vs_non_member",
        title="Members vs non-members",
        unit="EUR / orders",
        store="warehouse",
        package="loyalty",
        description="Orders (`Order Completed` events, by their own time, amount `total` else "
        "`revenue`) of resolved profiles, split by whether the buyer held a membership "
        "enrolled before the order: average basket (spend / orders), purchases per customer "
        "(orders / buyers) and spend per customer (spend / buyers) in the period.",
        build=member_vs_non_member,
        aggregation="distinct",
        integer=False,
        program_scoped=True,
        split="measure",
        split_keys=MEMBER_KEYS,
    ),
)
