"""Earning-rule conditions and formulas: a small JSON model compiled to Polars expressions.

Conditions are `{"all": [...]}`, `{"any": [...]}`, `{"not": {...}}`, a comparison
`{"field": "properties.total", "op": "gte", "value": 50}` or a saved segment's membership
`{"segment": "<segment id>", "member": true}` (the audience rule language's shape). Fields
come from a closed set of namespaces (`event.*`, `properties.*`, `member.*`, `traits.*`,
`attributes.*`), never from free SQL, and compile to expressions over the frame the engine
builds. A missing value compares false. The model mirrors the audience rule language so it
can later delegate to `segments`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from loyalty.errors import InvalidRule

Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "exists"]
Rounding = Literal["floor", "ceil", "half_up", "half_even"]

_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Computed attribute names, as `segments` allows them (columns of `profile_attributes`).
_ATTRIBUTE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
NAMESPACES = ("event", "member", "properties", "traits", "attributes")
EVENT_FIELDS = {"name": "event", "source_id": "source_id", "type": "type"}
MEMBER_FIELDS = {
    "tier": "tier_name",
    "tier_rank": "tier_rank",
    "seniority_days": "seniority_days",
    "status": "member_status",
}
# Rounding is done on the value rounded to 6 decimals, so 0.29 * 100 floors to 29, not 28.
PRECISION = 6
# The most points one award, adjustment, price or cap may hold: sums of many of them stay far
# inside the ledger's 64-bit integers. An event whose formula gives more (a garbage amount such
# as 1e25 or "Infinity") earns nothing, like an event without an amount.
POINTS_MAX = 10**12
# Counts and ranks are 32-bit integer columns in the operational store.
COUNT_MAX = 2**31 - 1


class Compare(BaseModel):
    """A comparison of one field with a value."""

    model_config = ConfigDict(extra="forbid")

    field: str
    op: Op = "eq"
    value: Any = None  # Any: a JSON scalar or list

    @model_validator(mode="after")
    def _known_field(self) -> Compare:
        namespace, _, rest = self.field.partition(".")
        if not rest or not _PATH.match(rest):
            raise ValueError(f"unknown field {self.field!r}")
        if namespace == "event" and rest not in EVENT_FIELDS:
            raise ValueError(f"event fields are {sorted(EVENT_FIELDS)}")
        if namespace == "member" and rest not in MEMBER_FIELDS:
            raise ValueError(f"member fields are {sorted(MEMBER_FIELDS)}")
        if namespace == "attributes" and not _ATTRIBUTE.match(rest):
            raise ValueError("attributes.<name>: a computed attribute's lower-case name")
        if namespace not in NAMESPACES:
            raise ValueError(
                "fields start with event., member., properties., traits. or attributes."
            )
        if self.op in {"in", "not_in"} and not isinstance(self.value, list):
            raise ValueError(f"{self.op} needs a list value")
        return self


class AllOf(BaseModel):
    """True when every sub-condition is true."""

    model_config = ConfigDict(extra="forbid")

    all: list[Condition]


class AnyOf(BaseModel):
    """True when at least one sub-condition is true."""

    model_config = ConfigDict(extra="forbid")

    any: list[Condition]


class Not(BaseModel):
    """True when the sub-condition is false."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    not_: Condition = Field(alias="not")


class SegmentRef(BaseModel):
    """Membership (or not, `member: false`) of a saved segment, as last refreshed."""

    model_config = ConfigDict(extra="forbid")

    segment: str = Field(min_length=1, max_length=36)
    member: bool = True


Condition = Compare | AllOf | AnyOf | Not | SegmentRef
AllOf.model_rebuild()
AnyOf.model_rebuild()
Not.model_rebuild()

CONDITION = TypeAdapter(Condition)


class Fixed(BaseModel):
    """A fixed number of points per event (bonuses: first purchase, review, referral)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["fixed"] = "fixed"
    points: int = Field(ge=0, le=POINTS_MAX)


class PerAmount(BaseModel):
    """`rate` points per currency unit of a property (default `properties.total`)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["per_amount"] = "per_amount"
    amount: str = "total"
    rate: float = Field(default=1.0, ge=0)
    rounding: Rounding = "floor"


class LineMatch(BaseModel):
    """Which order lines a line rule applies to (every given attribute must match)."""

    model_config = ConfigDict(extra="forbid")

    sku: list[str] | None = None
    category: list[str] | None = None
    brand: list[str] | None = None


class LineRule(BaseModel):
    """Points of matching lines: a multiplier of the line amount, or fixed points per unit."""

    model_config = ConfigDict(extra="forbid")

    match: LineMatch
    multiplier: float | None = Field(default=None, ge=0)
    fixed_per_unit: int | None = Field(default=None, ge=0, le=POINTS_MAX)

    @model_validator(mode="after")
    def _one_way(self) -> LineRule:
        if (self.multiplier is None) == (self.fixed_per_unit is None):
            raise ValueError("give exactly one of multiplier and fixed_per_unit")
        return self


class PerLine(BaseModel):
    """Points over `properties.products[]` (price * quantity * rate), by SKU, category, brand.

    The first line rule matching a line applies; other lines earn `default_multiplier`
    (0 to reward only the listed products). The sum is rounded once.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["per_line"] = "per_line"
    rate: float = Field(default=1.0, ge=0)
    rounding: Rounding = "floor"
    default_multiplier: float = Field(default=1.0, ge=0)
    lines: list[LineRule] = Field(default_factory=list)


Formula = Annotated[Fixed | PerAmount | PerLine, Field(discriminator="type")]
FORMULA: TypeAdapter[Fixed | PerAmount | PerLine] = TypeAdapter(Formula)

PRODUCT = pl.Struct(
    {
        "sku": pl.String,
        "category": pl.String,
        "brand": pl.String,
        "price": pl.Float64,
        "quantity": pl.Float64,
    }
)


def parse_condition(data: Any) -> Condition | None:  # Any: JSON
    """A condition from its JSON form (None means always true), or InvalidRule."""
    if data is None:
        return None
    try:
        return CONDITION.validate_python(data)
    except ValueError as exc:
        raise InvalidRule(f"invalid condition: {exc}") from None


def parse_formula(data: Any) -> Fixed | PerAmount | PerLine:  # Any: JSON
    """A formula from its JSON form, or InvalidRule."""
    try:
        return FORMULA.validate_python(data)
    except ValueError as exc:
        raise InvalidRule(f"invalid formula: {exc}") from None


def _json_path(column: str, path: str) -> pl.Expr:
    return pl.col(column).str.json_path_match("$." + path)


def field_expr(name: str) -> pl.Expr:
    """The expression reading a condition field from the engine's frame.

    JSON fields (`properties.*`, `traits.*`) are columns named after the field, added once
    per frame by `materialise`, so a path used by several rules is parsed once.
    """
    namespace, _, rest = name.partition(".")
    if namespace == "event":
        return pl.col(EVENT_FIELDS[rest])
    if namespace == "member":
        return pl.col(MEMBER_FIELDS[rest])
    if namespace in {"properties", "traits", "attributes"}:
        return pl.col(name)
    raise InvalidRule(f"unknown field {name!r}")


def segment_column(segment_id: str) -> str:
    """The engine frame's boolean column saying whether the row's profile is in a segment."""
    return f"segment:{segment_id}"


def json_fields(condition: Condition | None) -> set[str]:
    """The `properties.*` and `traits.*` fields a condition reads."""
    match condition:
        case Compare(field=name) if name.split(".", 1)[0] in {"properties", "traits"}:
            return {name}
        case AllOf(all=items) | AnyOf(any=items):
            return set().union(*(json_fields(c) for c in items)) if items else set()
        case Not(not_=inner):
            return json_fields(inner)
    return set()


def segment_ids(condition: Condition | None) -> set[str]:
    """The saved segments whose membership a condition reads."""
    match condition:
        case SegmentRef(segment=segment_id):
            return {segment_id}
        case AllOf(all=items) | AnyOf(any=items):
            return set().union(*(segment_ids(c) for c in items)) if items else set()
        case Not(not_=inner):
            return segment_ids(inner)
    return set()


@dataclass(frozen=True, slots=True)
class ProfileNeeds:
    """What conditions read of the member's profile: traits (JSON text), computed attributes
    (by name) and saved segments' memberships (by id). Only these are loaded."""

    traits: bool = False
    attributes: frozenset[str] = frozenset()
    segments: frozenset[str] = frozenset()

    @classmethod
    def of(cls, conditions: Iterable[Condition | None]) -> ProfileNeeds:
        """The profile data a set of conditions reads."""
        fields: set[str] = set()
        segments: set[str] = set()
        for condition in conditions:
            fields |= condition_fields(condition)
            segments |= segment_ids(condition)
        return cls(
            traits=any(f.startswith("traits.") for f in fields),
            attributes=frozenset(f.split(".", 1)[1] for f in fields if f.startswith("attributes.")),
            segments=frozenset(segments),
        )

    def __bool__(self) -> bool:
        return self.traits or bool(self.attributes) or bool(self.segments)


def with_profile_columns(frame: pl.DataFrame, needs: ProfileNeeds) -> pl.DataFrame:
    """The frame with every attribute and segment column the conditions read (null when the
    profile data was not loaded: no value, not a member), so a condition always compiles."""
    wanted: dict[str, pl.DataType] = {f"attributes.{a}": pl.String() for a in needs.attributes}
    wanted |= {segment_column(s): pl.Boolean() for s in needs.segments}
    missing = [pl.lit(None, dtype=t).alias(n) for n, t in wanted.items() if n not in frame.columns]
    return frame.with_columns(missing) if missing else frame


def condition_fields(condition: Condition | None) -> set[str]:
    """Every field a condition reads."""
    match condition:
        case Compare(field=name):
            return {name}
        case AllOf(all=items) | AnyOf(any=items):
            return set().union(*(condition_fields(c) for c in items)) if items else set()
        case Not(not_=inner):
            return condition_fields(inner)
    return set()


def formula_fields(formula: Fixed | PerAmount | PerLine) -> set[str]:
    """The `properties.*` fields a formula reads as scalars."""
    if isinstance(formula, PerAmount):
        if not _PATH.match(formula.amount):
            raise InvalidRule(f"invalid amount path {formula.amount!r}")
        return {f"properties.{formula.amount}"}
    return set()


def materialise(frame: pl.DataFrame, fields: set[str]) -> pl.DataFrame:
    """Add a text column per JSON field not yet in the frame (one JSON pass per field)."""
    missing = sorted(f for f in fields if f not in frame.columns)
    if not missing:
        return frame
    return frame.with_columns(
        _json_path(name.split(".", 1)[0], name.split(".", 1)[1]).alias(name) for name in missing
    )


def _typed(expr: pl.Expr, value: Any) -> tuple[pl.Expr, Any]:  # Any: JSON scalar
    """Cast the field like the value: numbers compare as numbers, booleans as JSON text."""
    if isinstance(value, bool):
        return expr.cast(pl.String), "true" if value else "false"
    if isinstance(value, int | float):
        return expr.cast(pl.Float64, strict=False), float(value)
    return expr.cast(pl.String), value


def compile_condition(condition: Condition | None) -> pl.Expr:
    """A boolean expression (never null) for a condition."""
    match condition:
        case None:
            return pl.lit(True)
        case Compare(field=name, op="exists"):
            return field_expr(name).is_not_null()
        case Compare(field=name, op=op, value=value) if op in {"in", "not_in"}:
            items = list(value)
            sample = next((v for v in items if v is not None), "")
            expr, _ = _typed(field_expr(name), sample)
            typed = [_typed(pl.lit(0), v)[1] for v in items]
            found = expr.is_in(typed).fill_null(False)
            return found if op == "in" else ~found
        case Compare(field=name, op="contains", value=value):
            return (
                field_expr(name)
                .cast(pl.String)
                .str.contains(str(value), literal=True)
                .fill_null(False)
            )
        case Compare(field=name, op=op, value=value):
            expr, typed_value = _typed(field_expr(name), value)
            compared: pl.Expr = {
                "eq": expr == typed_value,
                "ne": expr != typed_value,
                "gt": expr > typed_value,
                "gte": expr >= typed_value,
                "lt": expr < typed_value,
                "lte": expr <= typed_value,
            }[op]
            return compared.fill_null(False)
        case AllOf(all=items):
            return (
                pl.all_horizontal([compile_condition(c) for c in items]) if items else pl.lit(True)
            )
        case AnyOf(any=items):
            return (
                pl.any_horizontal([compile_condition(c) for c in items]) if items else pl.lit(False)
            )
        case Not(not_=inner):
            return ~compile_condition(inner)
        case SegmentRef(segment=segment_id, member=member):
            inside = pl.col(segment_column(segment_id)).fill_null(False)
            return inside if member else ~inside
    raise InvalidRule(f"unsupported condition {condition!r}")


def explain_condition(
    condition: Condition | None, row: pl.DataFrame
) -> dict[str, Any]:  # Any: JSON
    """Evaluate every node of a condition on a one-row frame, for the dry run."""
    row = with_profile_columns(
        materialise(row, json_fields(condition)), ProfileNeeds.of([condition])
    )
    result = bool(row.select(compile_condition(condition).alias("r")).item())
    match condition:
        case None:
            return {"condition": None, "result": True}
        case Compare(field=name, op=op, value=value):
            actual = row.select(field_expr(name).alias("v")).item()
            return {"field": name, "op": op, "value": value, "actual": actual, "result": result}
        case AllOf(all=items):
            return {"all": [explain_condition(c, row) for c in items], "result": result}
        case AnyOf(any=items):
            return {"any": [explain_condition(c, row) for c in items], "result": result}
        case Not(not_=inner):
            return {"not": explain_condition(inner, row), "result": result}
        case SegmentRef(segment=segment_id, member=member):
            inside = bool(row.select(pl.col(segment_column(segment_id)).fill_null(False)).item())
            return {"segment": segment_id, "member": member, "actual": inside, "result": result}
    raise InvalidRule(f"unsupported condition {condition!r}")


def round_points(expr: pl.Expr, mode: Rounding) -> pl.Expr:
    """Round a points amount to an integer with the formula's rounding mode.

    An amount that is not finite or above `POINTS_MAX` gives 0 points (it failed the cast to
    integers, and with it every later batch of the programme).
    """
    steady = (
        pl.when(expr.is_finite() & (expr.abs() <= POINTS_MAX))
        .then(expr)
        .otherwise(pl.lit(0.0))
        .round(PRECISION)
    )
    match mode:
        case "floor":
            rounded = steady.floor()
        case "ceil":
            rounded = steady.ceil()
        case "half_up":
            rounded = steady.round(0, mode="half_away_from_zero")
        case "half_even":
            rounded = steady.round(0, mode="half_to_even")
    return rounded.cast(pl.Int64)


def base_points(formula: Fixed | PerAmount | PerLine, frame: pl.DataFrame) -> pl.Series:
    """The unrounded points of a formula for each row of the engine's frame (Float64)."""
    match formula:
        case Fixed(points=points):
            return pl.Series("base", [float(points)] * frame.height, dtype=pl.Float64)
        case PerAmount(amount=path, rate=rate):
            if not _PATH.match(path):
                raise InvalidRule(f"invalid amount path {path!r}")
            # The engine materialises `properties.<path>` once per frame (`materialise`).
            column = f"properties.{path}"
            source = pl.col(column) if column in frame.columns else _json_path("properties", path)
            return frame.select(
                (source.cast(pl.Float64, strict=False).fill_null(0.0) * rate)
                .clip(lower_bound=0.0)
                .alias("base")
            ).to_series()
        case PerLine():
            return _per_line(formula, frame)
    raise InvalidRule(f"unsupported formula {formula!r}")


def _line_matches(match: LineMatch) -> pl.Expr:
    parts = [
        pl.col(attr).is_in(values).fill_null(False)
        for attr, values in (
            ("sku", match.sku),
            ("category", match.category),
            ("brand", match.brand),
        )
        if values
    ]
    return pl.all_horizontal(parts) if parts else pl.lit(True)


def _per_line(formula: PerLine, frame: pl.DataFrame) -> pl.Series:
    lines = (
        frame.select(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("row"),
            (
                # Parsed by the warehouse when the engine read the events, else here.
                pl.col("properties.products").cast(pl.List(PRODUCT))
                if "properties.products" in frame.columns
                else _json_path("properties", "products").str.json_decode(pl.List(PRODUCT))
            ).alias("line"),
        )
        .explode("line")
        .unnest("line")
        .with_columns(
            (pl.col("price").fill_null(0.0) * pl.col("quantity").fill_null(1.0)).alias("amount")
        )
    )
    points: pl.Expr = pl.col("amount") * formula.rate * formula.default_multiplier
    for rule in reversed(formula.lines):
        value = (
            pl.col("amount") * formula.rate * rule.multiplier
            if rule.multiplier is not None
            else pl.col("quantity").fill_null(1.0) * float(rule.fixed_per_unit or 0)
        )
        points = pl.when(_line_matches(rule.match)).then(value).otherwise(points)
    per_row = (
        lines.with_columns(points.fill_null(0.0).alias("p")).group_by("row").agg(pl.col("p").sum())
    )
    return (
        pl.DataFrame({"row": pl.int_range(frame.height, dtype=pl.Int64, eager=True)})
        .join(per_row, on="row", how="left")
        .sort("row")
        .select(pl.col("p").fill_null(0.0).clip(lower_bound=0.0).alias("base"))
        .to_series()
    )


def formula_rounding(formula: Fixed | PerAmount | PerLine) -> Rounding:
    """How a formula's points are rounded (fixed points are whole already)."""
    return "floor" if isinstance(formula, Fixed) else formula.rounding
