"""API models of the loyalty engine."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cdp.db import Instant
from cdp.identifiers import KIND_PATTERN
from loyalty import calendar, rules

ProgramStatus = Literal["draft", "active", "paused", "ended"]
Enrolment = Literal["automatic", "explicit"]
ExpiryPolicy = Literal["none", "rolling", "end_of_period"]
TierMetric = Literal["points", "spend", "orders"]
TierWindow = Literal["rolling_12_months", "calendar_year"]
MemberStatus = Literal["active", "unenrolled", "opted_out", "merged", "erased"]
EntryKind = Literal[
    "earn", "redeem", "refund", "reverse", "expire", "adjust", "import", "merge", "split"
]
MemberAction = Literal["enrol", "unenrol", "opt_out"]
RewardKind = Literal["coupon", "product", "partner_offer", "event_access"]


# An instant given to the API (`cdp.db.Instant`): one without a zone is UTC (the API's
# convention); the operational store refuses naive values, which answered 500.


class ProgramBase(BaseModel):
    """Fields shared by programme creation and reading."""

    name: str = Field(min_length=1, max_length=200)
    points_name: str = Field(default="points", min_length=1, max_length=50)
    point_value: float = Field(default=0.01, ge=0, description="Currency value of one point")
    currency: str = Field(default="EUR", min_length=3, max_length=3)
    enrolment: Enrolment = "explicit"
    pending_days: int = Field(default=0, ge=0, le=365)
    expiry_policy: ExpiryPolicy = "none"
    expiry_months: int | None = Field(default=None, ge=1, le=120)
    timezone: str = "UTC"
    tier_metric: TierMetric = "points"
    tier_window: TierWindow = "rolling_12_months"
    tier_grace_days: int = Field(default=0, ge=0, le=730)
    earn_history: bool = Field(
        default=True,
        description="true: activating the programme earns on the events already loaded (the"
        " real-time job starts from its mark, 0 for a new programme); false: each activation"
        " (from draft or pause) starts at the present, so only events loaded while it is"
        " active earn in real time; the history earns only through the backfill endpoint",
    )


class ProgramCreate(ProgramBase):
    """Body of a programme creation; programmes start as drafts unless told otherwise."""

    status: ProgramStatus = "draft"

    @model_validator(mode="after")
    def _expiry_needs_months(self) -> ProgramCreate:
        problem = calendar.expiry_problem(self.expiry_policy, self.expiry_months)
        if problem is not None:
            raise ValueError(problem)
        return self


class ProgramUpdate(BaseModel):
    """Body of a programme change: only the fields given are changed."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    points_name: str | None = Field(default=None, min_length=1, max_length=50)
    point_value: float | None = Field(default=None, ge=0)
    enrolment: Enrolment | None = None
    pending_days: int | None = Field(default=None, ge=0, le=365)
    expiry_policy: ExpiryPolicy | None = None
    expiry_months: int | None = Field(default=None, ge=1, le=120)
    timezone: str | None = None
    status: ProgramStatus | None = None
    tier_metric: TierMetric | None = None
    tier_window: TierWindow | None = None
    tier_grace_days: int | None = Field(default=None, ge=0, le=730)
    earn_history: bool | None = None


class ProgramRead(ProgramBase):
    """A programme."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    status: ProgramStatus
    last_event_id: int
    created_at: datetime
    updated_at: datetime


class MemberCommand(BaseModel):
    """Body of `POST /programs/{id}/members`: enrol, unenrol or opt a person out.

    The person is named one way: by `profile_id` (as issued by identity; a merged-away id
    counts for its survivor), or by `identifier_kind` + `identifier` (normalised and looked
    up as identity does).
    """

    profile_id: str | None = Field(default=None, min_length=1, max_length=64)
    identifier_kind: str | None = Field(
        default=None,
        pattern=KIND_PATTERN.pattern,
        description="Identifier kind, e.g. email, phone, loyalty_card (with `identifier`)",
    )
    identifier: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Identifier value as typed (normalised here), instead of `profile_id`",
    )
    action: MemberAction = "enrol"
    enrolled_at: Instant | None = Field(
        default=None, description="Backdate an enrolment (migrations); default now"
    )

    @model_validator(mode="after")
    def _one_way_to_name_the_person(self) -> MemberCommand:
        by_identifier = self.identifier_kind is not None or self.identifier is not None
        if self.profile_id is not None and by_identifier:
            raise ValueError("give profile_id or identifier_kind + identifier, not both")
        if self.profile_id is None and (self.identifier_kind is None or self.identifier is None):
            raise ValueError("give profile_id, or identifier_kind and identifier")
        return self


class MemberRead(BaseModel):
    """A membership."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    program_id: str
    profile_id: str
    status: MemberStatus
    enrolled_at: datetime
    status_changed_at: datetime
    tier_id: str | None
    tier_since: datetime | None
    merged_into: str | None


class ExpiringRead(BaseModel):
    """Points expiring on a local date of the programme."""

    date: date
    expires_at: datetime
    points: int


class TierProgress(BaseModel):
    """Where a member stands on the tier ladder."""

    tier_id: str | None
    tier_name: str | None
    metric: TierMetric
    window_start: datetime
    value: float
    next_tier_id: str | None
    next_tier_name: str | None
    next_threshold: float | None
    missing: float | None


class BalanceRead(BaseModel):
    """A member's balance, derived from the ledger's lots."""

    member_id: str
    active: int
    pending: int
    expired_unprocessed: int
    total: int
    next_pending_release: datetime | None
    expiring_soon: list[ExpiringRead]
    qualifying_points: int
    tier: TierProgress | None


class LedgerEntryRead(BaseModel):
    """One ledger entry."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    member_id: str
    kind: str
    points: int
    qualifying_points: int
    unrecovered: int
    status: str
    pending_until: datetime | None
    expires_at: datetime | None
    occurred_at: datetime
    local_date: date
    created_at: datetime
    event_id: int | None
    order_id: str | None
    rule_id: str | None
    redemption_id: str | None
    reason: str | None
    actor: str | None
    idempotency_key: str

    @classmethod
    def at(cls, entry: Any, now: datetime) -> LedgerEntryRead:  # Any: a LedgerEntry row
        """The entry as read at `now`: a credit written `pending` reads `active` once its
        pending period is over (the stored row is never updated; the lot's `pending_until`
        is what the balance uses)."""
        read = cls.model_validate(entry)
        if read.status == "pending" and (read.pending_until is None or read.pending_until <= now):
            read.status = "active"
        return read


class AdjustmentCreate(BaseModel):
    """Body of a manual adjustment: a reason is mandatory and kept in the audit trail."""

    points: int = Field(
        ge=-rules.POINTS_MAX, le=rules.POINTS_MAX, description="Positive credits, negative debits"
    )
    reason: str = Field(min_length=3, max_length=1000)
    qualifying: bool = Field(default=False, description="Also count toward tier progress")

    @model_validator(mode="after")
    def _not_zero(self) -> AdjustmentCreate:
        if self.points == 0:
            raise ValueError("points must not be 0")
        return self


class TierCreate(BaseModel):
    """Body of a tier creation."""

    name: str = Field(min_length=1, max_length=100)
    rank: int = Field(ge=1, le=rules.COUNT_MAX, description="1 is the lowest tier")
    threshold: float = Field(ge=0)
    multiplier: float = Field(default=1.0, ge=0)
    benefits: list[str] = Field(default_factory=list)


class TierRead(TierCreate):
    """A tier."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    program_id: str


class TierChangeRead(BaseModel):
    """One tier movement."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    member_id: str
    from_tier_id: str | None
    to_tier_id: str | None
    reason: str
    metric_value: float
    at: datetime = Field(description="When the change took effect (an event's time)")
    recorded_at: datetime = Field(description="When it was committed: the feed's order")


class RewardCreate(BaseModel):
    """Body of a reward creation."""

    name: str = Field(min_length=1, max_length=200)
    kind: RewardKind = "coupon"
    description: str | None = None
    points_cost: int = Field(gt=0, le=rules.POINTS_MAX)
    stock: int | None = Field(
        default=None, ge=0, le=rules.COUNT_MAX, description="None means unlimited"
    )
    per_member_limit: int | None = Field(default=None, ge=1, le=rules.COUNT_MAX)
    valid_from: Instant | None = None
    valid_until: Instant | None = None
    min_tier_id: str | None = None


class RewardRead(RewardCreate):
    """A reward."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    program_id: str
    status: str


class RedemptionCreate(BaseModel):
    """Body of a redemption."""

    reward_id: str


class RedemptionRead(BaseModel):
    """A redemption and its coupon code."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    member_id: str
    reward_id: str
    points: int
    coupon_code: str
    status: str
    entry_id: str
    cancel_entry_id: str | None
    created_at: datetime
    cancelled_at: datetime | None


class RedemptionCancel(BaseModel):
    """Body of a redemption cancellation."""

    reason: str = Field(default="cancelled", max_length=1000)


class MergeCommand(BaseModel):
    """A profile merge or split published by identity."""

    kind: Literal["merge", "split"] = "merge"
    from_profile_id: str
    to_profile_id: str
    reason: str | None = None

    @model_validator(mode="after")
    def _two_profiles(self) -> MergeCommand:
        # A profile merged into itself would leave its membership merged into itself.
        if self.from_profile_id == self.to_profile_id:
            raise ValueError("from_profile_id and to_profile_id must differ")
        return self


class MergeResult(BaseModel):
    """What a merge or split did in a programme."""

    program_id: str
    kind: str
    from_member_id: str | None
    to_member_id: str | None
    points_moved: int


RuleStatus = Literal["active", "inactive"]


def _check_condition(value: dict[str, Any] | None) -> dict[str, Any] | None:  # Any: JSON
    if value is None:
        return None
    parsed = rules.CONDITION.validate_python(value)
    dumped: dict[str, Any] = rules.CONDITION.dump_python(  # Any: JSON
        parsed, mode="json", by_alias=True, exclude_defaults=False
    )
    return dumped


def _check_formula(value: dict[str, Any]) -> dict[str, Any]:  # Any: JSON
    dumped: dict[str, Any] = rules.FORMULA.dump_python(  # Any: JSON
        rules.FORMULA.validate_python(value), mode="json"
    )
    return dumped


class RuleFields(BaseModel):
    """Fields of an earning rule (see docs/loyalty.md for conditions and formulas)."""

    name: str = Field(min_length=1, max_length=200)
    event_name: str = Field(min_length=1, max_length=200, description="Trigger event")
    condition: dict[str, Any] | None = Field(  # Any: JSON condition
        default=None,
        description="all/any/not + comparisons over event, properties, member, traits,"
        " attributes, and segment membership",
    )
    formula: dict[str, Any] = Field(  # Any: JSON formula
        description="fixed, per_amount or per_line"
    )
    priority: int = Field(
        default=100,
        ge=-rules.COUNT_MAX,
        le=rules.COUNT_MAX,
        description="Stacking order: lower runs first",
    )
    exclusive: bool = Field(default=False, description="When it fires, later rules do not")
    apply_tier_multiplier: bool = True
    qualifying: bool = Field(default=True, description="Counts toward tier progress")
    starts_at: Instant | None = None
    ends_at: Instant | None = None
    cap_per_day: int | None = Field(default=None, ge=0, le=rules.POINTS_MAX)
    cap_per_month: int | None = Field(default=None, ge=0, le=rules.POINTS_MAX)
    budget: int | None = Field(
        default=None, ge=0, le=rules.POINTS_MAX, description="Total points the rule may give"
    )
    limit_per_member: int | None = Field(
        default=None,
        ge=1,
        le=rules.COUNT_MAX,
        description="Times a member may earn it (1: first purchase)",
    )
    status: RuleStatus = "active"

    @field_validator("condition")
    @classmethod
    def _valid_condition(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_condition(value)

    @field_validator("formula")
    @classmethod
    def _valid_formula(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_formula(value)


class RuleCreate(RuleFields):
    """Body of a rule creation."""


class RuleUpdate(BaseModel):
    """Body of a rule change: only the fields given are changed."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    condition: dict[str, Any] | None = None  # Any: JSON condition
    formula: dict[str, Any] | None = None  # Any: JSON formula
    priority: int | None = Field(default=None, ge=-rules.COUNT_MAX, le=rules.COUNT_MAX)
    exclusive: bool | None = None
    apply_tier_multiplier: bool | None = None
    qualifying: bool | None = None
    starts_at: Instant | None = None
    ends_at: Instant | None = None
    cap_per_day: int | None = Field(default=None, ge=0, le=rules.POINTS_MAX)
    cap_per_month: int | None = Field(default=None, ge=0, le=rules.POINTS_MAX)
    budget: int | None = Field(default=None, ge=0, le=rules.POINTS_MAX)
    limit_per_member: int | None = Field(default=None, ge=1, le=rules.COUNT_MAX)
    status: RuleStatus | None = None

    @field_validator("condition")
    @classmethod
    def _valid_condition(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _check_condition(value)

    @field_validator("formula")
    @classmethod
    def _valid_formula(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else _check_formula(value)


class RuleRead(RuleFields):
    """An earning rule."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    program_id: str
    created_at: datetime


class SampleEvent(BaseModel):
    """An event to evaluate in a dry run."""

    event: str
    properties: dict[str, Any] = Field(default_factory=dict)  # Any: event properties
    timestamp: Instant | None = None
    source_id: str = "dry-run"
    type: str = "track"
    message_id: str = "dry-run"


class SampleMember(BaseModel):
    """The member of a dry run: an existing one (its tier, seniority and caps used, its
    profile's stored traits, attributes and segments unless given here), or a described one."""

    member_id: str | None = None
    tier: str | None = Field(default=None, description="Tier name, for a described member")
    enrolled_at: Instant | None = None
    traits: dict[str, Any] = Field(  # Any: profile traits
        default_factory=dict, description="Profile traits (empty: an existing member's stored)"
    )
    attributes: dict[str, Any] = Field(  # Any: attribute values
        default_factory=dict,
        description="Computed attribute values by name (replace an existing member's stored)",
    )
    segments: list[str] | None = Field(
        default=None,
        description="Ids of the saved segments the member is in (null: an existing member's"
        " stored memberships, none for a described member)",
    )


class DryRunRequest(BaseModel):
    """Body of a dry run: an event, a member, and optionally draft rules to try."""

    event: SampleEvent
    member: SampleMember = Field(default_factory=SampleMember)
    rules: list[RuleCreate] | None = Field(
        default=None, description="Rules to evaluate instead of the programme's active ones"
    )


class RuleVerdict(BaseModel):
    """What one rule did with the sample event, and why."""

    rule_id: str
    name: str
    fired: bool
    reason: str
    trigger_matched: bool
    in_window: bool | None
    condition: dict[str, Any] | None  # Any: JSON explanation tree
    blocked_by: str | None
    base: float | None
    multiplier: float | None
    raw_points: int
    points: int


class DryRunResult(BaseModel):
    """The verdict of every rule and the points the event would earn."""

    total_points: int
    rules: list[RuleVerdict]


class ProcessResultRead(BaseModel):
    """What a processing run or a backfill did."""

    events: int
    enrolled: int
    credits: int
    points: int
    reversals: int
    last_event_id: int


class ImportRowError(BaseModel):
    """A row of an opening-balance file that was not imported, and why."""

    row: int
    message: str


class ImportResult(BaseModel):
    """What an opening-balance import did (bad rows are reported, good ones imported)."""

    rows: int
    imported: int
    already_imported: int
    members_created: int
    tiers_set: int
    errors: list[ImportRowError]


class ExpiringMember(BaseModel):
    """A member with points expiring soon (for reminders)."""

    member_id: str
    profile_id: str
    points: int
    first_expiry: datetime


class CountAt(BaseModel):
    """A count in a period."""

    period: str
    count: int


class KpiRead(BaseModel):
    """Programme KPIs at an instant."""

    program_id: str
    at: datetime
    members: int
    active_members_30d: int
    enrolment_by_month: list[CountAt]
    points_issued: int
    points_redeemed: int
    points_expired: int
    points_reversed: int
    points_outstanding: int
    liability: float
    currency: str
    breakage_rate: float | None
    redemption_rate: float | None
    tier_distribution: dict[str, int]
    tier_movements_30d: dict[str, int]
    member_orders: int
    member_average_basket: float | None
    member_purchase_frequency: float | None
    non_member_orders: int
    non_member_average_basket: float | None
    non_member_purchase_frequency: float | None


class Reevaluation(BaseModel):
    """What a tier re-evaluation changed."""

    upgrades: int
    downgrades: int
    members: list[str]
