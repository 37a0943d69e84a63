"""The definitions marketers write: computed attributes and the audience rule language.

Rules are a discriminated union told apart by their key (`all`, `any`, `not`, `field`,
`event`, `segment`), nested to any depth. Parsing errors are reported with the path of the
offending node in the rule, e.g. `rule.all[2].any[0].value`.
"""

from __future__ import annotations

import builtins
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from cdp.config import SegmentsSettings
from segments.errors import InvalidRule

# Attribute names become column names of `profile_attributes`: lower-case identifiers only.
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
# Property and trait paths: dot-separated identifiers (`product.brand`), `[]` after a key for
# the elements of a list (`products[].category`); bound as JSON paths, never inlined.
PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\])*(\.[A-Za-z_][A-Za-z0-9_]*(\[\])*)*$")

Aggregation = Literal[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "first",
    "last",
    "count_distinct",
    "most_frequent",
    "days_since_first",
    "days_since_last",
]
Source = Literal["events", "purchases", "visits"]
FieldType = Literal["string", "number", "integer", "boolean", "timestamp"]

FilterOp = Literal[
    "eq", "neq", "gt", "gte", "lt", "lte", "between", "in", "contains", "starts_with", "exists"
]
CompareOp = Literal[
    "eq",
    "neq",
    "gt",
    "gte",
    "lt",
    "lte",
    "between",
    "in",
    "contains",
    "starts_with",
    "exists",
    "in_last_days",
    "more_than_days_ago",
    "birthday_in_next_days",
]

_AGG_NEEDS_PROPERTY = {"sum", "avg", "count_distinct", "most_frequent"}


def json_path(path: str) -> str:
    """The JSON path of a property path (`a.b` -> `$.a.b`, `a[].b` -> `$.a[*].b`), bound."""
    return "$." + path.replace("[]", "[*]")


def is_list_path(path: str) -> bool:
    """Whether a path goes through list elements (its value is a list of values)."""
    return "[]" in path


class PropertyFilter(BaseModel):
    """A condition on one property of an event: `{"property": "category", "op": "eq", ...}`."""

    model_config = ConfigDict(extra="forbid")

    property: str = Field(pattern=PATH.pattern, max_length=200)
    op: FilterOp
    value: JsonValue = None


class AttributeDefinition(BaseModel):
    """How a computed attribute is aggregated from a profile's events."""

    model_config = ConfigDict(extra="forbid")

    aggregation: Aggregation
    source: Source = Field(
        default="events",
        description="events; purchases (orders net of refunds, `amount` is the net amount); "
        "visits (one row per day with a visit)",
    )
    events: list[str] = Field(default=[], description="Event names (any when empty)")
    types: list[str] = Field(default=[], description="Event types, e.g. page (any when empty)")
    property: str | None = Field(default=None, pattern=PATH.pattern, max_length=200)
    where: list[PropertyFilter] = []
    window_days: int | None = Field(default=None, ge=1, le=36500)

    @model_validator(mode="after")
    def _coherent(self) -> AttributeDefinition:
        if self.aggregation in _AGG_NEEDS_PROPERTY and self.property is None:
            raise ValueError(f"aggregation {self.aggregation} needs a property")
        if self.property is not None and is_list_path(self.property):
            raise ValueError("property: list elements ([]) may be filtered on, not aggregated")
        if self.source == "visits" and (self.property or self.where or self.events or self.types):
            raise ValueError("visits have no events, types, property or filters")
        if self.source == "purchases" and (self.events or self.types):
            raise ValueError("purchases are defined by settings; events/types do not apply")
        return self

    @builtins.property  # `property` is a field of this model
    def value_type(self) -> FieldType:
        """The SQL type of the attribute's values."""
        match self.aggregation:
            case "count" | "count_distinct" | "days_since_first" | "days_since_last":
                return "integer"
            case "sum" | "avg":
                return "number"
            case "min" | "max":
                return "number" if self.property else "timestamp"
            case "first" | "last":
                return "string" if self.property else "timestamp"
            case "most_frequent":
                return "string"


def builtin_attributes(settings: SegmentsSettings) -> dict[str, AttributeDefinition]:
    """The attributes every installation has, from the purchase and visit settings."""
    del settings  # the sources `purchases` and `visits` read them at compile time
    p: Source = "purchases"
    return {
        "first_purchase_at": AttributeDefinition(aggregation="first", source=p),
        "last_purchase_at": AttributeDefinition(aggregation="last", source=p),
        "last_visit_at": AttributeDefinition(aggregation="last", source="visits"),
        "orders_count": AttributeDefinition(aggregation="count", source=p),
        "orders_365d": AttributeDefinition(aggregation="count", source=p, window_days=365),
        "visits_365d": AttributeDefinition(aggregation="count", source="visits", window_days=365),
        "spend_total": AttributeDefinition(aggregation="sum", source=p, property="amount"),
        "spend_365d": AttributeDefinition(
            aggregation="sum", source=p, property="amount", window_days=365
        ),
        "avg_basket": AttributeDefinition(aggregation="avg", source=p, property="amount"),
        "customer_since": AttributeDefinition(aggregation="first"),
        "days_since_last_purchase": AttributeDefinition(aggregation="days_since_last", source=p),
    }


# The rule language.


class AllOf(BaseModel):
    """Every sub-rule holds."""

    model_config = ConfigDict(extra="forbid")

    all: list[Rule] = Field(min_length=1)


class AnyOf(BaseModel):
    """At least one sub-rule holds."""

    model_config = ConfigDict(extra="forbid")

    any: list[Rule] = Field(min_length=1)


class Not(BaseModel):
    """The sub-rule does not hold (the complement among all profiles)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    not_: Rule = Field(alias="not")


class Compare(BaseModel):
    """A comparison of a trait, computed attribute or registered field with a value."""

    model_config = ConfigDict(extra="forbid")

    field: str = Field(max_length=200, description="e.g. traits.country, attributes.orders_count")
    op: CompareOp
    value: JsonValue = None


class CountSpec(BaseModel):
    """How many times an event must have been performed."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["at_least", "at_most", "exactly"] = "at_least"
    value: int = Field(default=1, ge=0, le=1_000_000)


class EventCondition(BaseModel):
    """Performed (or not) an event, with property filters, a count and a time window."""

    model_config = ConfigDict(extra="forbid")

    event: str = Field(max_length=200)
    performed: bool = True
    where: list[PropertyFilter] = []
    count: CountSpec = CountSpec()
    last_days: int | None = Field(default=None, ge=1, le=36500)
    since: datetime | None = None
    until: datetime | None = None

    @model_validator(mode="after")
    def _one_window(self) -> EventCondition:
        if self.last_days is not None and (self.since or self.until):
            raise ValueError("give last_days or since/until, not both")
        if self.since and self.until and self.since > self.until:
            raise ValueError("since is after until")
        return self

    @field_validator("since", "until")
    @classmethod
    def _naive_utc(cls, value: datetime | None) -> datetime | None:
        # Warehouse timestamps are naive UTC.
        if value is not None and value.tzinfo is not None:
            return value.astimezone(UTC).replace(tzinfo=None)
        return value


class SegmentRef(BaseModel):
    """Membership (or not) of another saved segment, evaluated with its current rule."""

    model_config = ConfigDict(extra="forbid")

    segment: str = Field(max_length=36)
    member: bool = True


def _rule_tag(value: Any) -> str | None:  # Any: raw JSON or a model
    if isinstance(value, dict):
        for key in ("all", "any", "not", "field", "event", "segment"):
            if key in value:
                return key
        return None
    tags: dict[type, str] = {
        AllOf: "all",
        AnyOf: "any",
        Not: "not",
        Compare: "field",
        EventCondition: "event",
        SegmentRef: "segment",
    }
    return tags.get(type(value))


Rule: TypeAlias = Annotated[
    Annotated[AllOf, Tag("all")]
    | Annotated[AnyOf, Tag("any")]
    | Annotated[Not, Tag("not")]
    | Annotated[Compare, Tag("field")]
    | Annotated[EventCondition, Tag("event")]
    | Annotated[SegmentRef, Tag("segment")],
    Discriminator(
        _rule_tag,
        custom_error_type="rule_kind",
        custom_error_message="a rule needs one of the keys all, any, not, field, event, segment",
    ),
]

AllOf.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()

RULE_ADAPTER: TypeAdapter[Rule] = TypeAdapter(Rule)
_TAGS = {"all", "any", "not", "field", "event", "segment"}


def format_path(loc: tuple[int | str, ...], root: str = "rule") -> str:
    """`rule.all[2].any[0].value` from a pydantic error location (union tags dropped)."""
    out = root
    expect_tag = True  # a union of rules is validated at the root, after list items and `not`
    parent: int | str | None = None
    for part in loc:
        if expect_tag and isinstance(part, str) and part in _TAGS:
            expect_tag = False
            continue
        if isinstance(part, int):
            out += f"[{part}]"
            expect_tag = parent in ("all", "any")
        else:
            out += f".{part}"
            expect_tag = part == "not"
        parent = part
    return out


def parse_rule(raw: Any, root: str = "rule") -> Rule:  # Any: JSON from the request
    """Validate a rule document; InvalidRule names the path of the first problem."""
    try:
        return RULE_ADAPTER.validate_python(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        path = format_path(tuple(first["loc"]), root)
        details = [
            {"path": format_path(tuple(e["loc"]), root), "message": e["msg"]} for e in errors
        ]
        raise InvalidRule(f"{path}: {first['msg']}", details=details) from None


def dump_rule(rule: Rule) -> dict[str, Any]:  # Any: JSON document
    """The JSON document of a rule (aliases, no defaults that were not given)."""
    data: dict[str, Any] = RULE_ADAPTER.dump_python(  # Any: JSON document
        rule, mode="json", by_alias=True, exclude_defaults=True
    )
    return data
