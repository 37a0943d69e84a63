"""The earning engine: events in, ledger credits, activity and reversals out.

`evaluate` is a pure, set-based function over a Polars frame of events joined with their
members: for each rule (in stacking order) it computes which rows fire and their points,
then applies per-member limits, daily and monthly caps and rule budgets with cumulative
sums in event order, starting from what the ledger already holds (`Priors`). Real-time
processing, one-by-one processing and backfill all call it; processing events one at a
time in event order gives the same ledger as processing them all at once, because every
cap is "what the ledger already holds + what earlier rows of this batch took".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import polars as pl
from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session, aliased

from cdp.db import all_rows, new_ids, utcnow
from loyalty import calendar, ledger, rules, status, tiers
from loyalty.errors import ProgramNotActive
from loyalty.models import Activity, LedgerEntry, Member, Program, Rule, Tier

logger = logging.getLogger(__name__)

ORDER_EVENT = "Order Completed"
REFUND_EVENT = "Order Refunded"
# The event the scheduled birthday job generates (see `service.award_birthdays`); rules
# triggered on it give birthday bonuses. Never read from the warehouse.
BIRTHDAY_EVENT = "Birthday"
# Amount properties read for spend and refunds, first present wins.
AMOUNT_PATHS = ("total", "revenue")
# Where a return names the sale it returns, first present wins (then `order_id`).
ORIGINAL_ORDER_PATHS = ("original_order_id", "original_transaction_id")
# An order event that may be a till return: a negative amount or quantity, or kind "refund".
_RETURN_HINT = r'"(?:total|revenue|quantity)"\s*:\s*-|"kind"\s*:\s*"refund"'
_QUANTITIES = pl.List(pl.Struct({"quantity": pl.Float64}))
_LINE_AMOUNTS = pl.List(
    pl.Struct({"price": pl.Float64, "unit_price": pl.Float64, "quantity": pl.Float64})
)
# Members that hold points: an active member, and one that left (unenrolled, opted out)
# keeping its points. Only active members earn and record orders; a refund of an order a
# member earned on is reversed, and recorded in its activity, whichever of these it is now.
HOLDING = ("active", "unenrolled", "opted_out")

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.Int64(),
    "message_id": pl.String(),
    "source_id": pl.String(),
    "type": pl.String(),
    "event": pl.String(),
    "timestamp": pl.Datetime("us", "UTC"),
    "properties": pl.String(),
    "profile_id": pl.String(),
}


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """An earning rule, parsed and ready to evaluate."""

    id: str
    name: str
    event_name: str
    condition: rules.Condition | None
    formula: rules.Fixed | rules.PerAmount | rules.PerLine
    priority: int = 100
    exclusive: bool = False
    apply_tier_multiplier: bool = True
    qualifying: bool = True
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    cap_per_day: int | None = None
    cap_per_month: int | None = None
    budget: int | None = None
    limit_per_member: int | None = None

    @classmethod
    def of(cls, rule: Rule) -> RuleSpec:
        """The spec of a stored rule."""
        return cls(
            id=rule.id,
            name=rule.name,
            event_name=rule.event_name,
            condition=rules.parse_condition(rule.condition),
            formula=rules.parse_formula(rule.formula),
            priority=rule.priority,
            exclusive=rule.exclusive,
            apply_tier_multiplier=rule.apply_tier_multiplier,
            qualifying=rule.qualifying,
            starts_at=rule.starts_at,
            ends_at=rule.ends_at,
            cap_per_day=rule.cap_per_day,
            cap_per_month=rule.cap_per_month,
            budget=rule.budget,
            limit_per_member=rule.limit_per_member,
        )


# Reads the profile data the rules' conditions need (`rules.ProfileNeeds`) for a list of
# profile ids, set-based: a frame keyed by `profile_id` with `traits` (JSON text),
# `attributes.<name>` (text) and `segment:<id>` (boolean) columns. Profiles absent from it
# have no traits, no attribute values and no segment.
ProfileLoader = Callable[[list[str]], pl.DataFrame]


def profile_needs(specs: list[RuleSpec]) -> rules.ProfileNeeds:
    """What these rules' conditions read of the members' profiles."""
    return rules.ProfileNeeds.of(s.condition for s in specs)


def warehouse_fields(specs: list[RuleSpec]) -> tuple[list[str], bool]:
    """The property paths worth having the warehouse parse for these rules (always
    `order_id`), and whether per-line rules need `products`."""
    fields = {"properties.order_id"}
    for spec in specs:
        fields |= rules.json_fields(spec.condition) | rules.formula_fields(spec.formula)
    paths = sorted(f.split(".", 1)[1] for f in fields if f.startswith("properties."))
    return paths, any(isinstance(s.formula, rules.PerLine) for s in specs)


def _empty(schema: dict[str, pl.DataType]) -> pl.DataFrame:
    return pl.DataFrame(schema=schema)


@dataclass(slots=True)
class Priors:
    """What the ledger already holds for the caps of the rules being evaluated."""

    day: pl.DataFrame = field(
        default_factory=lambda: _empty(
            {
                "rule_id": pl.String(),
                "member_id": pl.String(),
                "local_date": pl.Date(),
                "used_day": pl.Int64(),
            }
        )
    )
    month: pl.DataFrame = field(
        default_factory=lambda: _empty(
            {
                "rule_id": pl.String(),
                "member_id": pl.String(),
                "month": pl.Date(),
                "used_month": pl.Int64(),
            }
        )
    )
    budget: pl.DataFrame = field(
        default_factory=lambda: _empty({"rule_id": pl.String(), "used_budget": pl.Int64()})
    )
    count: pl.DataFrame = field(
        default_factory=lambda: _empty(
            {"rule_id": pl.String(), "member_id": pl.String(), "used_count": pl.Int64()}
        )
    )
    # Keys of awards of capped exclusive rules that the ledger holds for the batch's events:
    # a replay sees its own earlier awards in the caps, and must block where they blocked.
    written: set[str] = field(default_factory=set)


TRACE_COLUMNS = (
    "row",
    "event_id",
    "message_id",
    "member_id",
    "timestamp",
    "local_date",
    "month",
    "order_id",
    "rule_id",
    "priority",
    "rule_order",
    "in_window",
    "condition",
    "blocked_by",
    "base",
    "multiplier",
    "raw_points",
    "fired",
)


def prepare(frame: pl.DataFrame, tz: str) -> pl.DataFrame:
    """Order rows by event time and add the row index, local date, month and order id.

    A refund's order id is the sale it names (`original_order_id`, `original_transaction_id`,
    else `order_id`), so a till return, whose own id is its transaction's, finds its sale.
    """
    prepared = frame.sort("timestamp", "event_id").with_row_index("row")
    return prepared.with_columns(
        pl.col("timestamp").dt.convert_time_zone(tz).dt.date().alias("local_date"),
        _order_id_expr(prepared).alias("order_id"),
    ).with_columns(pl.col("local_date").dt.truncate("1mo").alias("month"))


def _order_id_expr(frame: pl.DataFrame) -> pl.Expr:
    """Each row's order id: the order's own, or for a refund the sale it names."""
    props = pl.col("properties")
    refund = pl.col("event") == REFUND_EVENT
    order_id = (
        pl.col("properties.order_id")
        if "properties.order_id" in frame.columns
        else props.str.json_path_match("$.order_id")
    )
    if frame.select(refund.any()).item():
        original = pl.coalesce(
            [props.str.json_path_match(f"$.{p}") for p in ORIGINAL_ORDER_PATHS] + [order_id]
        )
        order_id = pl.when(refund).then(original).otherwise(order_id)
    return order_id


def trace(frame: pl.DataFrame, specs: list[RuleSpec], priors: Priors) -> pl.DataFrame:
    """Every (row, rule) whose trigger matches: window, condition, stacking and raw points.

    `frame` is the output of `prepare` with member columns (member_id, tier_name, tier_rank,
    tier_multiplier, seniority_days, member_status, traits) and the profile data the
    conditions read (`attributes.<name>`, `segment:<id>`; absent ones count as null). An
    exclusive rule blocks the
    later rules of the rows where it fired, unless its caps or limit (`priors`: what the
    ledger holds) took all its points away there: a promotion capped for the day must not
    leave the member's next orders without their base points. Its caps depend only on its
    own fired rows, so they are computed (`apply_caps` of that rule alone) before the later
    rules are traced; `apply_caps` of all the rules then gives it the same points.
    A fired exclusive rule whose formula gives 0 points still blocks (a deliberate blocker).
    """
    fields: set[str] = set()
    for spec in specs:
        fields |= rules.json_fields(spec.condition) | rules.formula_fields(spec.formula)
    frame = rules.with_profile_columns(rules.materialise(frame, fields), profile_needs(specs))
    # The JSON texts are parsed already; only per-line formulas read `properties` again, so
    # the copies each rule's row filter makes stay narrow.
    needs_text = "properties.products" not in frame.columns and any(
        isinstance(s.formula, rules.PerLine) for s in specs
    )
    dropped = ["traits"] if needs_text else ["traits", "properties"]
    frame = frame.drop([c for c in dropped if c in frame.columns])
    blocked = pl.Series("blocked_by", [None] * frame.height, dtype=pl.String)
    parts: list[pl.DataFrame] = []
    by_name = {name: frame["event"] == name for name in {s.event_name for s in specs}}
    for order, spec in enumerate(stacking_order(specs)):
        mask = by_name[spec.event_name]
        sub = frame.filter(mask)
        if sub.is_empty():
            continue
        window = pl.lit(True)
        if spec.starts_at is not None:
            window = window & (pl.col("timestamp") >= spec.starts_at)
        if spec.ends_at is not None:
            window = window & (pl.col("timestamp") < spec.ends_at)
        multiplier = (
            pl.col("tier_multiplier").fill_null(1.0) if spec.apply_tier_multiplier else pl.lit(1.0)
        )
        rounding = rules.formula_rounding(spec.formula)
        part = (
            sub.with_columns(
                rules.base_points(spec.formula, sub).alias("base"),
                window.alias("in_window"),
                rules.compile_condition(spec.condition).alias("condition"),
                blocked.filter(mask).alias("blocked_by"),
                multiplier.cast(pl.Float64).alias("multiplier"),
                pl.lit(spec.id).alias("rule_id"),
                pl.lit(spec.priority).alias("priority"),
                pl.lit(order, dtype=pl.Int32).alias("rule_order"),
            )
            .with_columns(
                rules.round_points(pl.col("base") * pl.col("multiplier"), rounding).alias(
                    "raw_points"
                ),
                (
                    pl.col("in_window")
                    & pl.col("condition")
                    & pl.col("blocked_by").is_null()
                    & (pl.col("member_status") == "active")
                ).alias("fired"),
            )
            .select(TRACE_COLUMNS)
        )
        parts.append(part)
        if spec.exclusive:
            fired_rows = part.filter(pl.col("fired"))["row"]
            if _capped(spec):
                awarded = apply_caps(
                    part.with_columns(pl.lit(0, dtype=pl.Int32).alias("rule_order")),
                    [spec],
                    priors,
                )["row"]
                key = pl.concat_str(
                    pl.lit("event:"), pl.col("message_id"), pl.lit(f":rule:{spec.id}")
                )
                fired_rows = part.filter(
                    pl.col("fired")
                    & (
                        (pl.col("raw_points") <= 0)
                        | pl.col("row").is_in(awarded.implode())
                        | key.is_in(list(priors.written))
                    )
                )["row"]
            hit = frame["row"].is_in(fired_rows.implode())
            blocked = (
                pl.select(pl.when(hit & blocked.is_null()).then(pl.lit(spec.id)).otherwise(blocked))
                .to_series()
                .alias("blocked_by")
            )
    if not parts:
        return pl.DataFrame(schema={c: pl.Null() for c in TRACE_COLUMNS}).clear()
    return pl.concat(parts, how="vertical_relaxed")


def _capped(spec: RuleSpec) -> bool:
    """Whether caps or a per-member limit may lower the rule's points."""
    limits = (spec.cap_per_day, spec.cap_per_month, spec.budget, spec.limit_per_member)
    return any(limit is not None for limit in limits)


def _clamp(frame: pl.DataFrame, *, cap: str, used: str, over: list[str]) -> pl.DataFrame:
    """Clamp `points` so that prior use + this batch's running total never passes `cap`.

    With points >= 0, row i gets min(points_i, cap - used - sum of the raw points of the
    earlier rows), floored at 0: once the cap is reached, the earlier rows took exactly it.
    """
    before = pl.col("points").cum_sum().over(over) - pl.col("points")
    room = pl.col(cap) - pl.col(used).fill_null(0) - before
    clamped = pl.min_horizontal(pl.col("points"), room).clip(lower_bound=0)
    return frame.with_columns(
        pl.when(pl.col(cap).is_null()).then(pl.col("points")).otherwise(clamped).alias("points")
    )


# Running totals (caps, limits) accumulate in this order: event time then event id (the
# prepared `row`), then stacking order (`rule_order`: priority, then rule id).
EVENT_ORDER = ("row", "rule_order")
_SPEC_CAP = {"cap_day": "cap_per_day", "cap_month": "cap_per_month", "cap_budget": "budget"}


def _limit(fired: pl.DataFrame, limited: list[int], counts: pl.DataFrame) -> pl.DataFrame:
    """Drop the awards of limited rules past a member's limit (ledger count + rank here)."""
    inside = (
        fired.filter(pl.col("rule_order").is_in(limited))
        .join(counts, on=["rule_id", "member_id"], how="left")
        .sort("rule_order", "row")
        .with_columns(pl.int_range(1, pl.len() + 1).over(["rule_order", "member_id"]).alias("nth"))
        .filter(pl.col("nth") + pl.col("used_count").fill_null(0) <= pl.col("cap_count"))
        .drop("nth", "used_count")
    )
    return pl.concat(
        [fired.filter(~pl.col("rule_order").is_in(limited)), inside], how="vertical_relaxed"
    )


def stacking_order(specs: list[RuleSpec]) -> list[RuleSpec]:
    """The rules in the order they apply to an event: priority, then id."""
    return sorted(specs, key=lambda s: (s.priority, s.id))


def apply_caps(traced: pl.DataFrame, specs: list[RuleSpec], priors: Priors) -> pl.DataFrame:
    """The awards: fired rows after per-member limits, day and month caps and budgets.

    Rules are told apart by their stacking position (`rule_order`, an integer) rather than
    their id, and only the rows of limited or capped rules are sorted and summed.
    """
    ordered = stacking_order(specs)
    position = {s.id: i for i, s in enumerate(ordered)}
    caps = pl.DataFrame(
        {
            "rule_order": list(range(len(ordered))),
            "cap_day": [s.cap_per_day for s in ordered],
            "cap_month": [s.cap_per_month for s in ordered],
            "cap_budget": [s.budget for s in ordered],
            "cap_count": [s.limit_per_member for s in ordered],
            "qualifying": [s.qualifying for s in ordered],
        },
        schema={
            "rule_order": pl.Int32(),
            "cap_day": pl.Int64(),
            "cap_month": pl.Int64(),
            "cap_budget": pl.Int64(),
            "cap_count": pl.Int64(),
            "qualifying": pl.Boolean(),
        },
    )
    if traced.is_empty():
        return traced.with_columns(pl.lit(0).alias("points")).clear()
    fired = (
        traced.filter(pl.col("fired") & (pl.col("raw_points") > 0))
        .join(caps, on="rule_order", how="left")
        .with_columns(pl.col("raw_points").alias("points"))
    )
    limited = [position[s.id] for s in specs if s.limit_per_member is not None]
    if limited:
        fired = _limit(fired, limited, priors.count)
    steps: list[tuple[str, pl.DataFrame, list[str], str]] = [
        ("cap_day", priors.day, ["rule_id", "member_id", "local_date"], "used_day"),
        ("cap_month", priors.month, ["rule_id", "member_id", "month"], "used_month"),
        ("cap_budget", priors.budget, ["rule_id"], "used_budget"),
    ]
    for cap, prior, over, used in steps:
        capped = [position[s.id] for s in specs if getattr(s, _SPEC_CAP[cap]) is not None]
        if not capped:
            continue
        # Only the rows of capped rules go through the join and the running sums.
        inside = (
            fired.filter(pl.col("rule_order").is_in(capped))
            .join(prior, on=over, how="left")
            .sort(*EVENT_ORDER)
        )
        inside = _clamp(inside, cap=cap, used=used, over=over).drop(used)
        fired = pl.concat(
            [fired.filter(~pl.col("rule_order").is_in(capped)), inside], how="vertical_relaxed"
        )
    return (
        fired.filter(pl.col("points") > 0)
        .sort(*EVENT_ORDER)
        .with_columns(
            pl.when(pl.col("qualifying"))
            .then(pl.col("points"))
            .otherwise(0)
            .alias("qualifying_points"),
            pl.concat_str(
                pl.lit("event:"), pl.col("message_id"), pl.lit(":rule:"), pl.col("rule_id")
            ).alias("idempotency_key"),
        )
    )


def evaluate(frame: pl.DataFrame, specs: list[RuleSpec], priors: Priors, tz: str) -> pl.DataFrame:
    """Awards for a frame of member events: one row per (event, rule) with points > 0."""
    return apply_caps(trace(prepare(frame, tz), specs, priors), specs, priors)


def active_rules(session: Session, *, program_id: str) -> list[RuleSpec]:
    """The programme's active rules, in stacking order."""
    rows = session.scalars(
        select(Rule)
        .where(Rule.program_id == program_id, Rule.status == "active")
        .order_by(Rule.priority, Rule.id)
    ).all()
    return [RuleSpec.of(r) for r in rows]


def _normalise(events: pl.DataFrame) -> pl.DataFrame:
    frame = events
    dtype = frame.schema["timestamp"]
    if isinstance(dtype, pl.Datetime) and dtype.time_zone is None:
        frame = frame.with_columns(pl.col("timestamp").dt.replace_time_zone("UTC"))
    return returns_as_refunds(
        frame.with_columns(
            pl.col("timestamp").dt.convert_time_zone("UTC").dt.cast_time_unit("us"),
            pl.col("event_id").cast(pl.Int64),
            pl.col("properties").cast(pl.String).fill_null("{}"),
        )
    )


def returns_as_refunds(frame: pl.DataFrame) -> pl.DataFrame:
    """Till returns recorded as order events become `Order Refunded` events.

    A till export may record a return as an order whose total is negative, whose products
    all have negative quantities, or whose `kind` is "refund", naming the sale in
    `original_transaction_id`. Such a row earns nothing and reverses the sale's points
    exactly as an `Order Refunded` of the same amount would. Only rows whose JSON text
    hints at a return (a cheap regex) are parsed.
    """
    props = pl.col("properties")
    hinted = (pl.col("event") == ORDER_EVENT) & props.str.contains(_RETURN_HINT)
    candidates = frame.with_row_index("_row").filter(hinted)
    if candidates.is_empty():
        return frame
    quantities = (
        props.str.json_path_match("$.products")
        .str.json_decode(_QUANTITIES)
        .list.eval(pl.element().struct.field("quantity"))
    )
    confirmed = candidates.filter(
        (
            (_amount_expr() < 0)
            | (props.str.json_path_match("$.kind") == "refund")
            | ((quantities.list.max() < 0) & (quantities.list.len() > 0))
        ).fill_null(False)
    )["_row"]
    if confirmed.is_empty():
        return frame
    returns = pl.int_range(pl.len(), dtype=pl.UInt32).is_in(confirmed.implode())
    return frame.with_columns(
        pl.when(returns).then(pl.lit(REFUND_EVENT)).otherwise(pl.col("event")).alias("event")
    )


def _enrol_automatically(
    session: Session, *, program: Program, frame: pl.DataFrame, specs: list[RuleSpec]
) -> tuple[int, pl.DataFrame]:
    """Create memberships for profiles whose first qualifying event is in the batch.

    Returns how many were new and the rows tried (member_id, at: the enrolment instant);
    those of profiles that had a membership already were not written (see `member_events`).
    """
    triggers = [s.event_name for s in specs]
    first = (
        frame.filter(pl.col("event").is_in(triggers) & pl.col("profile_id").is_not_null())
        .group_by("profile_id")
        .agg(pl.col("timestamp").min().alias("enrolled_at"))
    )
    tried = pl.DataFrame(schema={"member_id": pl.String(), "at": pl.Datetime("us", "UTC")})
    if first.is_empty():
        return 0, tried
    rows = first.select(
        pl.Series("id", new_ids(first.height), dtype=pl.String),
        pl.lit(program.id).alias("program_id"),
        "profile_id",
        pl.lit("active").alias("status"),
        "enrolled_at",
        pl.lit(utcnow()).dt.convert_time_zone("UTC").alias("status_changed_at"),
        pl.lit(0).alias("lock_seq"),
    )
    inserted = ledger.bulk_insert(session, Member.__table__, rows)
    if not inserted:
        return 0, tried
    return inserted, rows.select(pl.col("id").alias("member_id"), pl.col("enrolled_at").alias("at"))


def member_frame(session: Session, *, program_id: str, profiles: list[str]) -> pl.DataFrame:
    """Members of the programme (of these profiles) with their tier fields."""
    query = (
        select(
            Member.profile_id,
            Member.id,
            Member.status,
            Member.enrolled_at,
            Tier.name,
            Tier.rank,
            Tier.multiplier,
        )
        .outerjoin(Tier, Tier.id == Member.tier_id)
        .where(Member.program_id == program_id)
    )
    batches = (
        [query]
        if len(profiles) > ledger.IN_LIST_LIMIT
        else [query.where(Member.profile_id.in_(chunk)) for chunk in ledger.in_chunks(profiles)]
    )
    rows = [row for q in batches for row in all_rows(session, q)]
    return pl.DataFrame(
        rows,
        schema={
            "profile_id": pl.String(),
            "member_id": pl.String(),
            "member_status": pl.String(),
            "enrolled_at": pl.Datetime("us", "UTC"),
            "tier_name": pl.String(),
            "tier_rank": pl.Int64(),
            "tier_multiplier": pl.Float64(),
        },
        orient="row",
    )


def load_priors(
    session: Session,
    *,
    specs: list[RuleSpec],
    members: list[str],
    since: date,
    events: pl.DataFrame | None = None,
) -> Priors:
    """What the ledger holds for capped rules, from the month of the batch's first day, and
    (`events`: the batch) the awards it holds of capped exclusive rules for those events."""
    priors = Priors()
    if events is not None:
        priors.written = _exclusive_written(session, specs=specs, events=events)
    ids = {
        "day": [s.id for s in specs if s.cap_per_day is not None],
        "month": [s.id for s in specs if s.cap_per_month is not None],
        "budget": [s.id for s in specs if s.budget is not None],
        "count": [s.id for s in specs if s.limit_per_member is not None],
    }
    earn = LedgerEntry.kind == "earn"
    # A merge leaves the absorbed member's earnings on it (only its lots move), yet they are
    # the survivor's history: its first-purchase bonus or its day's capped points count for
    # the survivor. The absorbed members are read first (by `merged_into`), then their
    # entries are read with the survivors' and counted for the survivor.
    absorbed = _absorbed_members(session, members=members)
    survivor_of = pl.col("member_id").replace(absorbed)
    # The batch's members only, in chunks: a backfill slice of 150k members reads their
    # rows through the caps index instead of every member's of the programme.
    chunks = ledger.in_chunks(sorted({*members, *absorbed}))
    if ids["day"] or ids["month"]:
        rows = [
            row
            for chunk in chunks
            for row in session.execute(
                select(
                    LedgerEntry.rule_id,
                    LedgerEntry.member_id,
                    LedgerEntry.local_date,
                    func.sum(LedgerEntry.points),
                )
                .where(
                    earn,
                    LedgerEntry.rule_id.in_(ids["day"] + ids["month"]),
                    LedgerEntry.member_id.in_(chunk),
                    LedgerEntry.local_date >= calendar.month_start(since),
                )
                .group_by(LedgerEntry.rule_id, LedgerEntry.member_id, LedgerEntry.local_date)
            ).all()
        ]
        daily = pl.DataFrame(
            rows,
            schema={
                "rule_id": pl.String(),
                "member_id": pl.String(),
                "local_date": pl.Date(),
                "used": pl.Int64(),
            },
            orient="row",
        )
        if absorbed:
            daily = (
                daily.with_columns(survivor_of)
                .group_by("rule_id", "member_id", "local_date")
                .agg(pl.col("used").sum())
            )
        priors.day = daily.filter(pl.col("rule_id").is_in(ids["day"])).rename({"used": "used_day"})
        priors.month = (
            daily.filter(pl.col("rule_id").is_in(ids["month"]))
            .with_columns(pl.col("local_date").dt.truncate("1mo").alias("month"))
            .group_by("rule_id", "member_id", "month")
            .agg(pl.col("used").sum().alias("used_month"))
        )
    if ids["budget"]:
        budget_rows = session.execute(
            select(LedgerEntry.rule_id, func.sum(LedgerEntry.points))
            .where(earn, LedgerEntry.rule_id.in_(ids["budget"]))
            .group_by(LedgerEntry.rule_id)
        ).all()
        priors.budget = pl.DataFrame(
            budget_rows, schema={"rule_id": pl.String(), "used_budget": pl.Int64()}, orient="row"
        )
    if ids["count"]:
        count_rows = [
            row
            for chunk in chunks
            for row in session.execute(
                select(LedgerEntry.rule_id, LedgerEntry.member_id, func.count())
                .where(
                    earn,
                    LedgerEntry.rule_id.in_(ids["count"]),
                    LedgerEntry.member_id.in_(chunk),
                )
                .group_by(LedgerEntry.rule_id, LedgerEntry.member_id)
            ).all()
        ]
        priors.count = pl.DataFrame(
            count_rows,
            schema={"rule_id": pl.String(), "member_id": pl.String(), "used_count": pl.Int64()},
            orient="row",
        )
        if absorbed:
            priors.count = (
                priors.count.with_columns(survivor_of)
                .group_by("rule_id", "member_id")
                .agg(pl.col("used_count").sum())
            )
    return priors


def _exclusive_written(
    session: Session, *, specs: list[RuleSpec], events: pl.DataFrame
) -> set[str]:
    """Keys of the awards of capped exclusive rules already written for these events (read
    through the unique key index, only for rows that trigger such a rule in its window)."""
    keys: list[str] = []
    for spec in specs:
        if not (spec.exclusive and _capped(spec)):
            continue
        rows = events.filter(pl.col("event") == spec.event_name)
        if spec.starts_at is not None:
            rows = rows.filter(pl.col("timestamp") >= spec.starts_at)
        if spec.ends_at is not None:
            rows = rows.filter(pl.col("timestamp") < spec.ends_at)
        keys += [f"event:{m}:rule:{spec.id}" for m in rows["message_id"].to_list()]
    return {
        key
        for chunk in ledger.in_chunks(sorted(set(keys)))
        for key in session.scalars(
            select(LedgerEntry.idempotency_key).where(LedgerEntry.idempotency_key.in_(chunk))
        )
    }


def _absorbed_members(session: Session, *, members: list[str]) -> dict[str, str]:
    """The memberships merged into these members: absorbed member id -> survivor's id."""
    found: dict[str, str] = {}
    for chunk in ledger.in_chunks(sorted(set(members))):
        rows = session.execute(
            select(Member.id, Member.merged_into).where(Member.merged_into.in_(chunk))
        ).all()
        found.update({absorbed: survivor for absorbed, survivor in rows if survivor})
    return found


@dataclass(slots=True)
class ProcessResult:
    """What processing a batch of events did."""

    events: int = 0
    enrolled: int = 0
    # Ledger entries written, and their points (replayed awards written before not counted).
    credits: int = 0
    points: int = 0
    reversals: int = 0
    members: list[str] = field(default_factory=list)


def _amount_expr() -> pl.Expr:
    return pl.coalesce(
        [
            pl.col("properties").str.json_path_match(f"$.{p}").cast(pl.Float64, strict=False)
            for p in AMOUNT_PATHS
        ]
    )


def _lines_amount_expr(*, absolute: bool) -> pl.Expr:
    """The sum of an event's lines' price (else unit price) x quantity (1 when absent)."""
    line = pl.coalesce(
        pl.element().struct.field("price"), pl.element().struct.field("unit_price")
    ) * pl.element().struct.field("quantity").fill_null(1.0)
    return (
        pl.col("properties")
        .str.json_path_match("$.products")
        .str.json_decode(_LINE_AMOUNTS)
        .list.eval(line.abs() if absolute else line)
        .list.sum()
    )


def _refund_amount_expr() -> pl.Expr:
    """The amount a refund gives back, positive whatever the sign it was recorded with:
    `total` (else `revenue`), else the sum of its lines' price x quantity; null means all."""
    lines = _lines_amount_expr(absolute=True)
    return pl.coalesce(_amount_expr().abs(), pl.when(lines > 0).then(lines))


def _order_spend(orders: pl.DataFrame) -> pl.DataFrame:
    """Order rows with their `spend`: `total` (else `revenue`), else the sum of their lines'
    price x quantity (what a line refund gives back is measured the same way, so refunding
    one line of two reverses half, not all); 0 without either. Lines netting below zero
    count 0: a negative spend on an order row would read as a refund of it."""
    with_amount = orders.with_columns(_amount_expr().alias("spend"))
    # Lines are parsed only for the (usually few) orders without an amount.
    missing = with_amount["spend"].is_null()
    if not missing.any():
        return with_amount
    return pl.concat(
        [
            with_amount.filter(~missing),
            with_amount.filter(missing).with_columns(
                _lines_amount_expr(absolute=False)
                .fill_null(0.0)
                .clip(lower_bound=0.0)
                .alias("spend")
            ),
        ]
    )


def member_events(
    session: Session,
    *,
    program: Program,
    events: pl.DataFrame,
    profile_data: ProfileLoader | None = None,
    specs: list[RuleSpec] | None = None,
    enrol: bool = True,
) -> tuple[pl.DataFrame, list[RuleSpec], int]:
    """Events of the batch joined with their members (auto-enrolling when the programme does)
    and, with `profile_data`, with the profile data of those members (read once per batch, for
    the profiles that have a member only)."""
    specs = active_rules(session, program_id=program.id) if specs is None else specs
    names = {s.event_name for s in specs} | {ORDER_EVENT, REFUND_EVENT}
    parsed = [c for c in events.columns if c.startswith("properties.")]
    frame = _normalise(events.select([*EVENT_SCHEMA, *parsed]))
    frame = frame.filter(pl.col("event").is_in(list(names)) & pl.col("profile_id").is_not_null())
    enrolled = 0
    tried = pl.DataFrame()
    if enrol and program.enrolment == "automatic":
        enrolled, tried = _enrol_automatically(session, program=program, frame=frame, specs=specs)
    profiles = frame["profile_id"].unique().to_list()
    members = member_frame(session, program_id=program.id, profiles=profiles)
    if enrolled:
        # The memberships this batch created are those read back with the ids it tried
        # (a profile that had one already, or got one from another writer, kept its own).
        status.record_many(
            session,
            program_id=program.id,
            members=tried.filter(pl.col("member_id").is_in(members["member_id"].implode())),
            status="active",
            reason="automatic",
        )
    followed = _refunds_follow_their_orders(
        session, program_id=program.id, frame=frame, members=members
    )
    if followed is not frame:  # some refunds took their order owner's profile
        frame = followed
        profiles = frame["profile_id"].unique().to_list()
        members = member_frame(session, program_id=program.id, profiles=profiles)
    joined = frame.join(members, on="profile_id", how="inner").with_columns(
        ((pl.col("timestamp") - pl.col("enrolled_at")).dt.total_days()).alias("seniority_days")
    )
    # A member that left and came back was away in between: its events of that period
    # neither earn nor record activity, whichever path processes them, and whenever.
    joined = status.at_events(session, program_id=program.id, frame=joined)
    loaded = None
    if profile_data is not None and not joined.is_empty():
        loaded = profile_data(joined["profile_id"].unique().sort().to_list())
    if loaded is not None and loaded.width > 1:
        joined = joined.join(loaded, on="profile_id", how="left")
    if "traits" in joined.columns:
        joined = joined.with_columns(pl.col("traits").cast(pl.String))
    else:
        joined = joined.with_columns(pl.lit(None, dtype=pl.String).alias("traits"))
    return joined, specs, enrolled


def _refunds_follow_their_orders(
    session: Session, *, program_id: str, frame: pl.DataFrame, members: pl.DataFrame
) -> pl.DataFrame:
    """A refund naming an order is the refund of the member holding points (`HOLDING`) that
    recorded that order: it keeps its profile when that is its own member, and otherwise
    takes that member's profile (a refund sent by a non-member, an unenrolled or opted-out
    member, a merged-away profile, a profile re-keyed by a merge since the sale, or another
    member's card), so the order's points are reversed where they are, whether or not that
    member is still active; replaying it later, once memberships moved again, then finds
    it done. The order's owner is the member of its activity row in the ledger (following
    merges to the survivor) or, for a sale earlier in the same batch (time, then event id)
    that records activity, the member of that row: what processing the events one by one
    would see. A refund whose order no such member recorded is dropped, whoever sends it:
    the refund of an order bought while away (unenrolled or opted out then, whether or not
    back since) or before enrolling never earned and was never recorded, so it reverses
    nothing and records no negative spend or orders. A refund naming no order is dropped
    unless its profile's member is active, which records its amount as negative spend."""
    refund = pl.col("event") == REFUND_EVENT
    if frame.is_empty() or not frame.select(refund.any()).item():
        return frame
    active = members.filter(pl.col("member_status") == "active")["profile_id"].implode()
    keyed = frame.with_row_index("_i").with_columns(_order_id_expr(frame).alias("_order"))
    refunds = keyed.filter(
        refund & (pl.col("_order").is_not_null() | ~pl.col("profile_id").is_in(active))
    ).select("_i", "_order", "profile_id", "timestamp", "event_id")
    if refunds.is_empty():
        return frame
    orders = refunds["_order"].drop_nulls().unique().to_list()
    owner, live = aliased(Member), aliased(Member)
    recorded = pl.DataFrame(
        [
            tuple(row)
            for chunk in ledger.in_chunks(orders)
            for row in session.execute(
                select(Activity.order_id, live.profile_id, Activity.occurred_at, Activity.event_id)
                .join(owner, owner.id == Activity.member_id)
                .join(live, live.id == func.coalesce(owner.merged_into, owner.id))
                .where(
                    Activity.program_id == program_id,
                    Activity.orders > 0,
                    Activity.order_id.in_(chunk),
                    live.status.in_(HOLDING),
                )
            ).all()
        ],
        schema={
            "_order": pl.String(),
            "_owner": pl.String(),
            "timestamp_sale": pl.Datetime("us", "UTC"),
            "event_id_sale": pl.Int64(),
        },
        orient="row",
    )
    sales = keyed.filter(
        (pl.col("event") == ORDER_EVENT)
        & pl.col("_order").is_in(orders)
        & pl.col("profile_id").is_in(active)
    )
    # A sale bought while its member was away (unenrolled or opted out then, back since)
    # recorded nothing: it owns no refund, as when the two were processed at the time.
    sales = (
        status.at_events(
            session,
            program_id=program_id,
            frame=sales.join(
                members.select("profile_id", "member_id", "member_status"), on="profile_id"
            ),
        )
        .filter(pl.col("member_status") == "active")
        .select(
            "_order",
            pl.col("profile_id").alias("_owner"),
            pl.col("timestamp").alias("timestamp_sale"),
            pl.col("event_id").alias("event_id_sale"),
        )
    )
    in_batch = refunds.join(sales, on="_order").filter(
        (pl.col("timestamp_sale") < pl.col("timestamp"))
        | (
            (pl.col("timestamp_sale") == pl.col("timestamp"))
            & (pl.col("event_id_sale") < pl.col("event_id"))
        )
    )
    # Each refund's owner: its own member when it recorded the order, else the first one
    # that did, in the ledger before the batch.
    owners = (
        pl.concat(
            [
                refunds.join(recorded, on="_order").with_columns(pl.lit(0).alias("_batch")),
                in_batch.with_columns(pl.lit(1).alias("_batch")),
            ],
            how="vertical_relaxed",
        )
        .sort(
            "_i",
            pl.col("_owner") != pl.col("profile_id"),
            "_batch",
            "timestamp_sale",
            "event_id_sale",
        )
        .unique("_i", keep="first", maintain_order=True)
    )
    moved = owners.filter(pl.col("_owner") != pl.col("profile_id")).select("_i", "_owner")
    dropped = refunds.filter(~pl.col("_i").is_in(owners["_i"].implode()))["_i"]
    if moved.is_empty() and dropped.is_empty():
        return frame
    return (
        frame.with_row_index("_i")
        .join(moved, on="_i", how="left", maintain_order="left")
        .with_columns(pl.coalesce("_owner", "profile_id").alias("profile_id"))
        .filter(~pl.col("_i").is_in(dropped.implode()))
        .drop("_i", "_owner")
    )


def process_events(
    session: Session,
    *,
    program: Program,
    events: pl.DataFrame,
    profile_data: ProfileLoader | None = None,
    now: datetime | None = None,
) -> ProcessResult:
    """Award, record activity and reverse refunds for a batch of events of profiles.

    `events` has the warehouse `events` columns (event_id, message_id, source_id, type,
    event, timestamp, properties as JSON text) plus `profile_id`. `profile_data` reads the
    profile data of the batch's members for `traits.*`, `attributes.*` and segment conditions
    (`service.profile_loader` reads the warehouse); without it they see no traits, no
    attribute values and no segment. Idempotent: replaying any event writes nothing new.
    """
    if program.status not in {"active", "draft"}:
        raise ProgramNotActive(f"programme {program.id} is {program.status}")
    now = now or utcnow()
    result = ProcessResult(events=events.height)
    if events.is_empty():
        return result
    steps = Steps()
    frame, specs, result.enrolled = member_events(
        session, program=program, events=events, profile_data=profile_data
    )
    steps.done("members")
    if frame.is_empty():
        return result
    prepared = prepare(frame, program.timezone)
    awards = pl.DataFrame()
    priors = Priors()
    if specs:
        priors = load_priors(
            session,
            specs=specs,
            members=prepared["member_id"].unique().to_list(),
            since=prepared["local_date"].min(),  # type: ignore[arg-type]
            events=prepared,
        )
    steps.done("priors")
    ladder = tiers.ladder(session, program_id=program.id)
    ranks: pl.DataFrame | None = None
    if ladder:
        awards, ranks = _evaluate_with_tiers(
            session, program=program, prepared=prepared, specs=specs, priors=priors, ladder=ladder
        )
    elif specs:
        awards = apply_caps(trace(prepared, specs, priors), specs, priors)
    steps.done("rules")
    if not awards.is_empty():
        credits = awards.select(
            "member_id",
            pl.lit("earn").alias("kind"),
            "points",
            "qualifying_points",
            pl.col("timestamp").alias("occurred_at"),
            "idempotency_key",
            "event_id",
            "message_id",
            "order_id",
            "rule_id",
        )
        written = ledger.write_credits_counted(session, program=program, frame=credits, now=now)
        # Points actually written by this run: a replayed event's awards are evaluated again
        # (caps and tiers need them) but were written before.
        result.credits, result.points = written.entries, written.points
    steps.done("credits")
    _record_activity(session, program=program, frame=prepared)
    steps.done("activity")
    result.reversals = _reverse_refunds(session, program=program, frame=prepared, now=now)
    steps.done("reversals")
    result.members = sorted(
        prepared.filter(pl.col("member_status") == "active")["member_id"].unique().to_list()
    )
    # Upgrades are immediate: each at the event that reached the threshold, and the events
    # after it in the batch already earned with the new tier (see `_evaluate_with_tiers`).
    if ranks is not None:
        tiers.apply_row_upgrades(session, program=program, ladder_=ladder, ranks=ranks)
    steps.done("upgrades")
    logger.debug("processed %d events: %s", result.events, steps)
    return result


class Steps:
    """Seconds spent in each step of a batch or a real-time pass, for the debug log
    (profiling); a step done again adds to its time."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 2)
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v} s" for k, v in self.seconds.items())


# A condition on these fields makes a rule's outcome depend on the member's tier.
_TIER_FIELDS = frozenset({"member.tier", "member.tier_rank"})


def _tier_dependent(specs: list[RuleSpec], ladder: list[Tier]) -> bool:
    multipliers = any(t.multiplier != 1.0 for t in ladder) and any(
        s.apply_tier_multiplier for s in specs
    )
    conditions = any(rules.condition_fields(s.condition) & _TIER_FIELDS for s in specs)
    return multipliers or conditions


def _with_tiers(prepared: pl.DataFrame, ladder: list[Tier], ranks: pl.Series) -> pl.DataFrame:
    """The frame with each row's tier columns set from its rank (0: no tier)."""
    table = pl.DataFrame(
        {
            "tier_rank": [t.rank for t in ladder],
            "tier_name": [t.name for t in ladder],
            "tier_multiplier": [t.multiplier for t in ladder],
        },
        schema={"tier_rank": pl.Int64(), "tier_name": pl.String(), "tier_multiplier": pl.Float64()},
    )
    return (
        prepared.drop("tier_rank", "tier_name", "tier_multiplier")
        .with_columns(ranks.cast(pl.Int64).alias("tier_rank"))
        .join(table, on="tier_rank", how="left", maintain_order="left")
        .with_columns(pl.when(pl.col("tier_rank") > 0).then(pl.col("tier_rank")).alias("tier_rank"))
    )


def _evaluate_with_tiers(
    session: Session,
    *,
    program: Program,
    prepared: pl.DataFrame,
    specs: list[RuleSpec],
    priors: Priors,
    ladder: list[Tier],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Awards where every event earns with the tier its member holds at that event.

    One-by-one processing upgrades a member right after the event that reaches a threshold,
    so the next event earns with the new multiplier. A batch does the same set-based: with
    the tiers held at each row, compute the awards, then the metric after each row (the
    ledger's values before the batch + what each row adds: qualifying points of its awards
    and of its refund's reversal, or its spend / order), hence the tier at each row; repeat
    until the tiers no longer change. Tiers only go up during processing and each pass fixes
    at least the next upgrade, so it ends within (number of tiers + 1) passes. Returns the
    awards and `tiers.row_ranks` of the final pass.
    """
    rows = prepared.select(
        "row",
        "member_id",
        "timestamp",
        "event_id",
        pl.col("tier_rank").fill_null(0).alias("current_rank"),
    )
    rows = rows.with_columns(
        tiers.ranks_at(session, program=program, ladder_=ladder, rows=rows)
    ).drop("current_rank")
    before = _tier_priors(session, program=program, prepared=prepared)
    activity = (
        _activity(session, program=program, frame=prepared)
        if program.tier_metric != "points"
        else None
    )
    current = rows["start_rank"]
    awards = pl.DataFrame()
    ranks = pl.DataFrame()
    dependent = _tier_dependent(specs, ladder)
    for _ in range(len(ladder) + 3):
        framed = _with_tiers(prepared, ladder, current) if dependent else prepared
        if specs:
            awards = apply_caps(trace(framed, specs, priors), specs, priors)
        if activity is not None:
            column = "spend" if program.tier_metric == "spend" else "orders"
            added = activity.select(
                "member_id", pl.col("timestamp").alias("occurred_at"), "row", pl.col(column)
            ).rename({column: "value"})
        else:
            added = _points_added(session, program=program, prepared=prepared, awards=awards)
        ranks = tiers.row_ranks(
            program, ladder, rows, pl.concat([before, added], how="vertical_relaxed")
        )
        found = ranks["rank_before"]
        if not dependent or found.equals(current.cast(pl.Int64)):
            break
        current = found
    return awards, ranks


def _tier_priors(session: Session, *, program: Program, prepared: pl.DataFrame) -> pl.DataFrame:
    """What the ledger counts toward the tier metric for the batch's members (and the
    memberships merged into them) in the windows of the batch, events of the batch excepted.

    What lies in every row's window and before every row (from the latest window start to
    the first event, which no event of the batch can have written) is summed per member in
    SQL, dated at that window start; the rest comes one entry at a time. A real-time batch
    (its rows share one window start) thus reads one row per member, not its year of entries.

    Columns member_id (the surviving member), occurred_at, row (null), value.
    """
    members = prepared["member_id"].unique().to_list()
    starts = tiers.window_starts(program, prepared["timestamp"])
    start, latest_start = starts.min(), starts.max()
    first, end = prepared["timestamp"].min(), prepared["timestamp"].max()
    owner = func.coalesce(Member.merged_into, Member.id)
    if program.tier_metric == "points":
        table: Any = LedgerEntry  # Any: an ORM class
        value: Any = LedgerEntry.qualifying_points  # Any: a column of either table
    else:
        table = Activity
        value = Activity.spend if program.tier_metric == "spend" else Activity.orders
    by_time = len(members) > ledger.IN_LIST_LIMIT
    # A batch's members are read by member: the window is compared through an expression no
    # index serves, or SQLite walked the ledger's time index over the whole window for each
    # thousand members (40 s for a day's birthdays at 8.5M entries, and as long for every
    # real-time batch of a programme with tiers).
    when = table.occurred_at if by_time else ledger.unindexed(table.occurred_at)
    # Read by member, the programme is the members' own (a membership merges only within
    # its programme): without a condition on it, the ledger's read is index-only (the
    # members' entries index covers the tier metric, migration 0016).
    scope = [table.program_id == program.id] if by_time else []
    summed = latest_start < first  # type: ignore[operator]
    one_by_one = (
        or_(and_(when >= start, when < latest_start), and_(when >= first, when <= end))
        if summed
        else and_(when >= start, when <= end)
    )
    entries = (
        select(owner, table.occurred_at, table.event_id, value)
        .join(Member, Member.id == table.member_id)
        .where(*scope, value != 0, one_by_one)
    )
    sums = (
        select(owner, func.sum(value))
        .join(Member, Member.id == table.member_id)
        .where(*scope, value != 0, when >= latest_start, when < first)
        .group_by(owner)
    )
    chunks: list[Any] = [None] if by_time else list(ledger.in_chunks(members))  # Any: ids

    def of(query: Any, chunk: list[str] | None) -> Any:  # Any: a Select
        if chunk is None:
            return query
        return query.where(or_(Member.id.in_(chunk), Member.merged_into.in_(chunk)))

    rows = [row for chunk in chunks for row in all_rows(session, of(entries, chunk))]
    if summed:
        rows += [
            (member, latest_start, None, total)
            for chunk in chunks
            for member, total in all_rows(session, of(sums, chunk))
        ]
    found = pl.DataFrame(
        rows,
        schema={
            "member_id": pl.String(),
            "occurred_at": pl.Datetime("us", "UTC"),
            "event_id": pl.Int64(),
            "value": pl.Float64(),
        },
        orient="row",
    )
    batch_events = prepared["event_id"].drop_nulls().implode()
    return found.filter(
        pl.col("event_id").is_null() | ~pl.col("event_id").is_in(batch_events)
    ).select(
        "member_id",
        "occurred_at",
        pl.lit(None, dtype=pl.Int64).alias("row"),
        "value",
    )


def _points_added(
    session: Session, *, program: Program, prepared: pl.DataFrame, awards: pl.DataFrame
) -> pl.DataFrame:
    """Qualifying points each row adds: its awards, minus what its refund will reverse."""
    schema = {
        "member_id": pl.String(),
        "occurred_at": pl.Datetime("us", "UTC"),
        "row": pl.Int64(),
        "value": pl.Float64(),
    }
    parts = [pl.DataFrame(schema=schema)]
    if not awards.is_empty():
        parts.append(
            awards.select(
                "member_id",
                pl.col("timestamp").alias("occurred_at"),
                pl.col("row").cast(pl.Int64),
                pl.col("qualifying_points").cast(pl.Float64).alias("value"),
            )
        )
    parts.append(_reversal_values(session, program=program, prepared=prepared, awards=awards))
    return pl.concat(parts, how="vertical_relaxed")


def _activity_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """The purchase activity of a prepared batch: one row per order (spend, 1 order) of
    active members and per refund (-amount) of members holding points (`HOLDING`: an
    unenrolled or opted-out member's refund of an order it recorded still lowers its
    spend), in row order, with the frame's columns kept. The batch holds only refunds of
    orders their member recorded, and active members' refunds naming no order
    (`_refunds_follow_their_orders`)."""
    orders = frame.filter(
        ((pl.col("event") == ORDER_EVENT) & (pl.col("member_status") == "active"))
        | ((pl.col("event") == REFUND_EVENT) & pl.col("member_status").is_in(HOLDING))
    )
    is_order = pl.col("event") == ORDER_EVENT
    # Refund amounts may need their lines parsed: only on the (few) refund rows.
    return (
        pl.concat(
            [
                _order_spend(orders.filter(is_order)),
                orders.filter(~is_order).with_columns(
                    (-_refund_amount_expr().fill_null(0.0)).alias("spend"),
                    _refund_amount_expr().is_null().alias("whole"),
                ),
            ],
            how="diagonal_relaxed",
        )
        .with_columns(
            pl.when(is_order).then(1).otherwise(0).alias("orders"),
            pl.col("whole").fill_null(False),
        )
        .sort("row")
    )


def _activity(session: Session, *, program: Program, frame: pl.DataFrame) -> pl.DataFrame:
    """`_activity_frame` with the refunds that complete an order counting -1 order.

    The orders tier metric counts orders minus fully refunded ones: a refund counts -1 when
    it has no amount (the whole order) or brings what the order's refunds gave back to its
    spend, and the order still counts (it was recorded, and no earlier refund took it off).
    A partial refund leaves the order counted: the customer still bought the rest. The
    order's activity comes from the ledger (rows of the batch's own activity excepted, so a
    replay counts the same) and from the batch, in event order (time, then event id), as
    one-by-one processing sees it. A replayed sale of a member now away records nothing in
    the batch, so its row is taken from the ledger.
    """
    activity = _activity_frame(frame)
    refunds = activity.filter((pl.col("event") == REFUND_EVENT) & pl.col("order_id").is_not_null())
    if refunds.is_empty():
        return activity
    orders = refunds["order_id"].unique().to_list()
    batch_events = set(activity["event_id"].drop_nulls().to_list())
    seen = [
        row
        for chunk in ledger.in_chunks(orders)
        for row in session.execute(
            select(
                Activity.order_id,
                Activity.occurred_at,
                Activity.event_id,
                Activity.spend,
                Activity.orders,
            ).where(Activity.program_id == program.id, Activity.order_id.in_(chunk))
        ).all()
        if row.event_id is None or row.event_id not in batch_events
    ]
    # (time, event id, batch row or None, spend, orders, whole refund) per order.
    history: dict[str, list[tuple[datetime, int, int | None, float, int, bool]]] = {}
    for order, at, event_id, spend, counted in seen:
        history.setdefault(str(order), []).append(
            (at, event_id or 0, None, float(spend), int(counted), False)
        )
    batch = activity.filter(pl.col("order_id").is_in(orders))
    for order, at, event_id, row, spend, counted, whole in batch.select(
        "order_id", "timestamp", "event_id", "row", "spend", "orders", "whole"
    ).iter_rows():
        history.setdefault(order, []).append(
            (at, event_id or 0, row, float(spend), int(counted), whole)
        )
    removed: list[int] = []
    for items in history.values():
        sold = refunded = 0.0
        counted = 0
        for _, _, row, spend, orders_, whole in sorted(items, key=lambda i: (i[0], i[1])):
            if spend > 0 or orders_ > 0:
                sold += max(spend, 0.0)
                counted += orders_
                continue
            if row is not None:
                refunded += -spend
                if counted > 0 and (whole or refunded >= sold - 1e-9):
                    removed.append(row)
                    counted -= 1
            else:
                refunded += -spend
                counted += orders_
    if not removed:
        return activity
    return activity.with_columns(
        pl.when(pl.col("row").is_in(removed)).then(-1).otherwise(pl.col("orders")).alias("orders")
    )


def _record_activity(session: Session, *, program: Program, frame: pl.DataFrame) -> None:
    """One activity row per order (spend, +1 order) and per refund (-amount; -1 order when it
    completes the order's refund)."""
    spend = _activity(session, program=program, frame=frame)
    if spend.is_empty():
        return
    rows = spend.select(
        pl.col("member_id"),
        pl.col("event_id"),
        pl.col("order_id"),
        pl.col("spend"),
        pl.col("orders"),
        pl.col("timestamp").alias("occurred_at"),
        pl.concat_str(pl.lit(f"activity:{program.id}:"), pl.col("message_id")).alias(
            "idempotency_key"
        ),
    ).with_columns(
        pl.Series("id", new_ids(spend.height), dtype=pl.String),
        pl.lit(program.id).alias("program_id"),
    )
    ledger.bulk_insert(session, Activity.__table__, rows)


def _reversal_values(
    session: Session, *, program: Program, prepared: pl.DataFrame, awards: pl.DataFrame
) -> pl.DataFrame:
    """The qualifying points each refund row of the batch will reverse (negative values).

    The same sums as `_reverse_refunds`, done ahead for the whole batch: the orders' earnings
    and reversals in the ledger plus the batch's awards, their spend and earlier refunds
    (ledger activity plus the batch's). What the batch derives again (the earnings of its
    active members' events, its refunds' reversals, its activity) is taken from the batch
    and left out of the ledger's rows, so a replay counts the same; a replayed sale of a
    member now away earns and records nothing in the batch, so it comes from the ledger.
    Columns member_id, occurred_at, row, value.
    """
    schema = {
        "member_id": pl.String(),
        "occurred_at": pl.Datetime("us", "UTC"),
        "row": pl.Int64(),
        "value": pl.Float64(),
    }
    refunds = prepared.filter(
        (pl.col("event") == REFUND_EVENT)
        & pl.col("order_id").is_not_null()
        & pl.col("member_status").is_in(HOLDING)
    )
    if refunds.is_empty():
        return pl.DataFrame(schema=schema)
    refunds = refunds.with_columns(_refund_amount_expr().alias("amount"))
    orders = refunds["order_id"].unique().to_list()
    earning = prepared.filter(pl.col("member_status") == "active")["event_id"].drop_nulls()
    reversing = refunds["event_id"].drop_nulls()
    batch_activity = _activity_frame(prepared).filter(pl.col("order_id").is_in(orders))
    entry_rows = [
        row
        for chunk in ledger.in_chunks(orders)
        for row in session.execute(
            select(
                LedgerEntry.order_id,
                LedgerEntry.kind,
                LedgerEntry.event_id,
                LedgerEntry.points,
                LedgerEntry.qualifying_points,
                LedgerEntry.unrecovered,
            ).where(
                LedgerEntry.program_id == program.id,
                LedgerEntry.order_id.in_(chunk),
                LedgerEntry.kind.in_(["earn", "reverse"]),
            )
        ).all()
    ]
    entries = pl.DataFrame(
        entry_rows,
        schema={
            "order_id": pl.String(),
            "kind": pl.String(),
            "event_id": pl.Int64(),
            "points": pl.Int64(),
            "qualifying": pl.Int64(),
            "unrecovered": pl.Int64(),
        },
        orient="row",
    ).filter(
        pl.col("event_id").is_null()
        | ((pl.col("kind") == "earn") & ~pl.col("event_id").is_in(earning.implode()))
        | ((pl.col("kind") == "reverse") & ~pl.col("event_id").is_in(reversing.implode()))
    )
    activity_rows = [
        row
        for chunk in ledger.in_chunks(orders)
        for row in session.execute(
            select(
                Activity.order_id, Activity.event_id, Activity.occurred_at, Activity.spend
            ).where(Activity.program_id == program.id, Activity.order_id.in_(chunk))
        ).all()
    ]
    activity = pl.DataFrame(
        activity_rows,
        schema={
            "order_id": pl.String(),
            "event_id": pl.Int64(),
            "timestamp": pl.Datetime("us", "UTC"),
            "spend": pl.Float64(),
        },
        orient="row",
    ).filter(
        pl.col("event_id").is_null()
        | ~pl.col("event_id").is_in(batch_activity["event_id"].drop_nulls().implode())
    )
    activity = pl.concat(
        [activity, batch_activity.select("order_id", "event_id", "timestamp", "spend")],
        how="vertical_relaxed",
    )
    earned: dict[str, list[int]] = {o: [0, 0] for o in orders}
    reversed_: dict[str, list[int]] = {o: [0, 0] for o in orders}
    for order, kind, _, points, qualifying, unrecovered in entries.iter_rows():
        if kind == "earn":
            earned[order][0] += points
            earned[order][1] += qualifying
        else:
            reversed_[order][0] += -points + unrecovered
            reversed_[order][1] += -qualifying
    if not awards.is_empty():
        by_order = (
            awards.filter(pl.col("order_id").is_in(orders))
            .group_by("order_id")
            .agg(pl.col("points").sum(), pl.col("qualifying_points").sum())
        )
        for order, points, qualifying in by_order.iter_rows():
            earned[order][0] += points
            earned[order][1] += qualifying
    spent = dict(
        activity.filter(pl.col("spend") > 0)
        .group_by("order_id")
        .agg(pl.col("spend").sum())
        .iter_rows()
    )
    refunds_by_order: dict[str, list[tuple[datetime, int, float]]] = {}
    for order, event_id, at, spend in activity.filter(pl.col("spend") < 0).iter_rows():
        refunds_by_order.setdefault(order, []).append((at, event_id, -spend))
    values: list[tuple[str, datetime, int, float]] = []
    for row in refunds.sort("timestamp", "event_id").iter_rows(named=True):
        order = row["order_id"]
        points, qualifying = earned[order]
        if not points:
            continue
        at, event_id = row["timestamp"], row["event_id"]
        amount = row["amount"]
        total = spent.get(order, 0.0)
        if amount is None or not total:
            share = 1.0
        else:
            before = sum(
                a
                for t, e, a in refunds_by_order.get(order, [])
                if t < at or (t == at and event_id is not None and e is not None and e < event_id)
            )
            share = min(1.0, (before + float(amount)) / float(total))
        back = int(round_half_up(points * share)) - reversed_[order][0]
        back_q = int(round_half_up(qualifying * share)) - reversed_[order][1]
        if back <= 0 and back_q <= 0:
            continue
        reversed_[order][0] += max(back, 0)
        reversed_[order][1] += max(back_q, 0)
        if back_q > 0:
            values.append((row["member_id"], at, int(row["row"]), -float(back_q)))
    return pl.DataFrame(values, schema=schema, orient="row")


def _order_sums(
    session: Session, *, program: Program, orders: list[str]
) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, float], dict[str, list[Any]]]:
    """What the ledger holds for these orders: points and qualifying points earned, and
    reversed so far (unrecovered included), spend, and the refunds' activity
    (occurred_at, event_id, amount). Any: mixed row values."""
    earned: dict[str, list[int]] = {}
    reversed_: dict[str, list[int]] = {}
    spent: dict[str, float] = {}
    refunds: dict[str, list[Any]] = {}
    for chunk in ledger.in_chunks(orders):
        for order, kind, points, qualifying, unrecovered in session.execute(
            select(
                LedgerEntry.order_id,
                LedgerEntry.kind,
                func.sum(LedgerEntry.points),
                func.sum(LedgerEntry.qualifying_points),
                func.sum(LedgerEntry.unrecovered),
            )
            .where(
                LedgerEntry.program_id == program.id,
                LedgerEntry.order_id.in_(chunk),
                LedgerEntry.kind.in_(["earn", "reverse"]),
            )
            .group_by(LedgerEntry.order_id, LedgerEntry.kind)
        ).all():
            if order is None:
                continue
            if kind == "earn":
                earned[order] = [int(points), int(qualifying)]
            else:
                reversed_[order] = [int(-points + unrecovered), int(-qualifying)]
        for order, event_id, at, spend in session.execute(
            select(
                Activity.order_id, Activity.event_id, Activity.occurred_at, Activity.spend
            ).where(Activity.program_id == program.id, Activity.order_id.in_(chunk))
        ).all():
            if order is None:
                continue
            if spend > 0:
                spent[order] = spent.get(order, 0.0) + float(spend)
            elif spend < 0:
                refunds.setdefault(order, []).append((at, event_id, -float(spend)))
    return earned, reversed_, spent, refunds


def _reverse_refunds(
    session: Session, *, program: Program, frame: pl.DataFrame, now: datetime
) -> int:
    """Reverse the points of refunded orders, in proportion to the amount refunded.

    Set-based, with the very result of reversing each refund in turn (time order):
    target reversal after a refund = round(points earned by the order * refunded so far /
    order amount); the refund reverses the target minus what earlier refunds reversed.
    Points come first from the order's own lots (pending ones included), then from the
    member's other lots alive at the refund's time; what the balance cannot cover is
    recorded as `unrecovered`. Qualifying points are reversed in the same proportion. A
    member that left (unenrolled, opted out) keeps its points, so its refunds are reversed
    too: otherwise it would keep the points of returned goods once it enrols again. The
    ledger's sums, spend and lots are read once for the whole batch, the reversals planned
    in memory and written in bulk (entries, draws, lot updates).
    """
    refunds = frame.filter(
        (pl.col("event") == REFUND_EVENT)
        & pl.col("order_id").is_not_null()
        & pl.col("member_status").is_in(HOLDING)
    )
    if refunds.is_empty():
        return 0
    refunds = (
        refunds.with_columns(_refund_amount_expr().alias("amount"))
        .sort("timestamp", "event_id")
        .with_columns(
            pl.concat_str(
                pl.lit("event:"), pl.col("message_id"), pl.lit(f":reverse:{program.id}")
            ).alias("key")
        )
    )
    keys = refunds["key"].to_list()
    done = {
        key
        for chunk in ledger.in_chunks(keys)
        for key in session.scalars(
            select(LedgerEntry.idempotency_key).where(LedgerEntry.idempotency_key.in_(chunk))
        )
    }
    refunds = refunds.filter(~pl.col("key").is_in(list(done))).unique(
        "key", keep="first", maintain_order=True
    )
    if refunds.is_empty():
        return 0
    orders = refunds["order_id"].unique().to_list()
    earned, reversed_, spent, refund_activity = _order_sums(session, program=program, orders=orders)
    members = refunds.filter(pl.col("order_id").is_in(list(earned)))["member_id"].unique()
    ledger.lock_members(session, member_ids=members.to_list())
    lots = ledger.lots_of_members(session, member_ids=members.to_list())
    shares: list[float] = []
    for row in refunds.iter_rows(named=True):
        order = row["order_id"]
        at, event_id, amount = row["timestamp"], row["event_id"], row["amount"]
        total = spent.get(order, 0.0)
        if amount is None or not total:
            shares.append(1.0)
            continue
        before = sum(
            a
            for t, e, a in refund_activity.get(order, [])
            if t < at or (t == at and event_id is not None and e is not None and e < event_id)
        )
        shares.append(min(1.0, (before + float(amount)) / float(total)))
    # The targets of every refund, rounded in one go (`round_half_up` of each).
    earned_of = refunds.select(
        pl.col("order_id")
        .replace_strict(list(earned), [p for p, _ in earned.values()], default=0)
        .cast(pl.Float64)
        .alias("points"),
        pl.col("order_id")
        .replace_strict(list(earned), [q for _, q in earned.values()], default=0)
        .cast(pl.Float64)
        .alias("qualifying"),
        pl.Series("share", shares, dtype=pl.Float64),
    ).select(
        _round_half_up(pl.col("points") * pl.col("share")).alias("target"),
        _round_half_up(pl.col("qualifying") * pl.col("share")).alias("target_q"),
    )
    entries: list[dict[str, Any]] = []  # Any: column values
    draws: list[tuple[str, str, int]] = []
    for row, share, target, target_q in zip(
        refunds.iter_rows(named=True),
        shares,
        earned_of["target"].to_list(),
        earned_of["target_q"].to_list(),
        strict=True,
    ):
        order = row["order_id"]
        if not earned.get(order, [0, 0])[0]:
            continue
        at, event_id = row["timestamp"], row["event_id"]
        done_points, done_qualifying = reversed_.setdefault(order, [0, 0])
        back = int(target) - done_points
        back_q = int(target_q) - done_qualifying
        if back <= 0 and back_q <= 0:
            continue
        plan, left = ledger.plan_reversal(
            lots[row["member_id"]], points=max(back, 0), order_id=order, as_of=at
        )
        reversed_[order] = [done_points + max(back, 0), done_qualifying + max(back_q, 0)]
        entry = ledger.entry_id(row["key"])
        draws.extend((entry, lot_id, take) for lot_id, take in plan)
        entries.append(
            {
                "id": entry,
                "program_id": program.id,
                "member_id": row["member_id"],
                "kind": "reverse",
                "points": -(max(back, 0) - left),
                "qualifying_points": -max(back_q, 0),
                "unrecovered": left,
                "status": "active",
                "pending_until": None,
                "expires_at": None,
                "occurred_at": at,
                "local_date": calendar.local_date(at, program.timezone),
                "created_at": now,
                "event_id": event_id,
                "message_id": None,
                "order_id": order,
                "rule_id": None,
                "redemption_id": None,
                "reason": f"order {order} refunded ({share:.0%})",
                "actor": None,
                "idempotency_key": row["key"],
            }
        )
    utc = pl.Datetime("us", "UTC")
    entry_frame = pl.DataFrame(
        entries,
        schema={
            "id": pl.String(),
            "program_id": pl.String(),
            "member_id": pl.String(),
            "kind": pl.String(),
            "points": pl.Int64(),
            "qualifying_points": pl.Int64(),
            "unrecovered": pl.Int64(),
            "status": pl.String(),
            "pending_until": utc,
            "expires_at": utc,
            "occurred_at": utc,
            "local_date": pl.Date(),
            "created_at": utc,
            "event_id": pl.Int64(),
            "message_id": pl.String(),
            "order_id": pl.String(),
            "rule_id": pl.String(),
            "redemption_id": pl.String(),
            "reason": pl.String(),
            "actor": pl.String(),
            "idempotency_key": pl.String(),
        },
    )
    draw_frame = pl.DataFrame(
        draws,
        schema={"entry_id": pl.String(), "lot_id": pl.String(), "points": pl.Int64()},
        orient="row",
    )
    return ledger.write_debits(session, entries=entry_frame, draws=draw_frame)


def _round_half_up(values: pl.Expr) -> pl.Expr:
    return values.round(rules.PRECISION).round(0, mode="half_away_from_zero").cast(pl.Int64)


def round_half_up(value: float) -> int:
    """Round half away from zero (for shares of points)."""
    return int(pl.select(_round_half_up(pl.lit(value, dtype=pl.Float64))).item())
