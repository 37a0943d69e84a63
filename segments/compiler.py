"""Compilers to DuckDB SQL: computed attributes (one statement, one scan) and segment rules.

This is the one module of the package that assembles SQL text (ruff S608 is ignored for it in
pyproject.toml): identifiers come only from code constants and from the closed field
catalogue through `quote_ident`; every value a user wrote is bound as a `$pN` parameter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from cdp.config import SegmentsSettings
from cdp.warehouse import Query, quote_ident
from segments.errors import InvalidRule
from segments.fields import Catalog, CatalogField
from segments.rules import (
    AllOf,
    AnyOf,
    AttributeDefinition,
    Compare,
    EventCondition,
    FieldType,
    Not,
    PropertyFilter,
    Rule,
    SegmentRef,
    is_list_path,
    json_path,
)

MAX_DEPTH = 64

SQL_TYPES: dict[FieldType, str] = {
    "string": "VARCHAR",
    "number": "DOUBLE",
    "integer": "BIGINT",
    "boolean": "BOOLEAN",
    "timestamp": "TIMESTAMP",
}


class Params:
    """Bound parameters of one statement: `add(value)` returns its placeholder `$pN`."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self._seen: dict[tuple[type, object], str] = {}

    def add(self, value: object) -> str:
        """Bind a value and return its placeholder (one placeholder per distinct scalar)."""
        key = (type(value), value) if isinstance(value, str | int | float | date) else None
        if key is not None and key in self._seen:
            return self._seen[key]
        name = "$" + f"p{len(self.values)}"
        self.values[name[1:]] = value
        if key is not None:
            self._seen[key] = name
        return name


def _json_value(column: str, path: str, ftype: FieldType, params: Params) -> str:
    """The typed value at a JSON path of a JSON column (the path is bound, not inlined)."""
    text = f"json_extract_string({column}, {params.add(json_path(path))})"
    if ftype == "string":
        return text
    return f"TRY_CAST({text} AS {SQL_TYPES[ftype]})"


# Computed attributes.


@dataclass(frozen=True, slots=True)
class _Agg:
    name: str
    definition: AttributeDefinition
    expr: str  # the aggregate expression inside its source's GROUP BY
    value: str | None = None  # most_frequent: the value counted
    condition: str = "TRUE"  # most_frequent: which rows count


def _source_alias(source: str) -> str:
    return {"events": "seg_ev", "purchases": "seg_purchases", "visits": "seg_visits"}[source]


def _attribute_value(
    definition: AttributeDefinition, ftype: FieldType, params: Params
) -> str | None:
    prop = definition.property
    if prop is None:
        return None
    if definition.source == "purchases" and prop in ("amount", "order_id"):
        return "x.amount" if prop == "amount" else "x.order_id"
    return _json_value("x.properties", prop, ftype, params)


def _attribute_condition(
    definition: AttributeDefinition, params: Params, now: datetime, value: str | None
) -> list[str]:
    conds: list[str] = []
    if definition.events:
        conds.append(f"x.event IN ({', '.join(params.add(e) for e in definition.events)})")
    if definition.types:
        conds.append(f"x.type IN ({', '.join(params.add(t) for t in definition.types)})")
    if definition.window_days is not None:
        conds.append(f"x.timestamp >= {params.add(now - timedelta(days=definition.window_days))}")
    for i, flt in enumerate(definition.where):
        ftype = _value_type(flt.value)
        conds.append(
            _property_filter(flt, "x.properties", ftype, params, f"definition.where[{i}]", now)
        )
    if value is not None:
        conds.append(f"{value} IS NOT NULL")
    return conds


def _value_type(value: object) -> FieldType:
    """The type of a filter's value, for attribute filters (no catalogue to tell it)."""
    sample = value[0] if isinstance(value, list) and value else value
    if isinstance(sample, bool):
        return "boolean"
    if isinstance(sample, int | float):
        return "number"
    return "string"


def _aggregate(
    name: str, definition: AttributeDefinition, params: Params, now: datetime, today: str
) -> _Agg:
    agg = definition.aggregation
    numeric: FieldType = "number"
    value = _attribute_value(
        definition, numeric if agg in ("sum", "avg", "min", "max") else "string", params
    )
    conds = _attribute_condition(definition, params, now, value)
    filt = f" FILTER (WHERE {' AND '.join(conds)})" if conds else ""
    order = "(x.timestamp)" if definition.source == "visits" else "(x.timestamp, x.event_id)"
    match agg:
        case "count":
            expr = f"count(*){filt}"
        case "sum" | "avg":
            expr = f"{agg}({value}){filt}"
        case "min" | "max":
            expr = f"{agg}({value if value else 'x.timestamp'}){filt}"
        case "first":
            expr = f"arg_min({value}, {order}){filt}" if value else f"min(x.timestamp){filt}"
        case "last":
            expr = f"arg_max({value}, {order}){filt}" if value else f"max(x.timestamp){filt}"
        case "count_distinct":
            expr = f"count(DISTINCT {value}){filt}"
        case "days_since_first":
            expr = f"date_diff('day', CAST(min(x.timestamp){filt} AS DATE), {today})"
        case "days_since_last":
            expr = f"date_diff('day', CAST(max(x.timestamp){filt} AS DATE), {today})"
        case "most_frequent":
            # Computed in CTEs of its own (counts per value); see compile_attributes.
            return _Agg(name, definition, "", value, " AND ".join(conds) or "TRUE")
    return _Agg(name, definition, expr)


def compile_attributes(
    definitions: Mapping[str, AttributeDefinition],
    *,
    settings: SegmentsSettings,
    event_profiles_sql: str,
    now: datetime,
) -> Query:
    """One statement computing every attribute of every profile from one scan of the events.

    Columns: profile_id, computed_at, then one column per attribute in the given order.
    `now` is naive UTC; relative windows start `now - N days`.
    """
    params = Params()
    now_p = params.add(now)
    today = params.add(now.date())
    purchase = settings.purchase
    used = {d.source for d in definitions.values()}
    steps: list[tuple[str, str]] = [
        ("seg_ep", event_profiles_sql),
        (
            "seg_ev",
            "SELECT ep.profile_id, e.event_id, e.type, e.event, e.timestamp, e.properties\n"
            "FROM events e JOIN seg_ep ep ON ep.event_id = e.event_id",
        ),
    ]
    if "purchases" in used:
        amount = ", ".join(
            f"TRY_CAST(json_extract_string(properties, {params.add(json_path(p))}) AS DOUBLE)"
            for p in purchase.amount_properties
        )
        order_id = (
            f"json_extract_string(properties, {params.add(json_path(purchase.order_id_property))})"
        )
        steps += [
            (
                "seg_orders",
                f"SELECT profile_id, event_id, timestamp, properties, coalesce({amount}) AS amount,"
                f" {order_id} AS order_id\nFROM seg_ev WHERE event = {params.add(purchase.event)}",
            ),
            (
                "seg_refunds",
                # A refund without an amount refunds the whole order.
                f"SELECT profile_id, {order_id} AS order_id, sum(coalesce({amount})) AS amount,"
                f" bool_or(coalesce({amount}) IS NULL) AS full_refund\n"
                f"FROM seg_ev WHERE event = {params.add(purchase.refund_event)}"
                f" AND {order_id} IS NOT NULL GROUP BY ALL",
            ),
            (
                "seg_purchases",
                "SELECT o.profile_id, o.event_id, o.timestamp, o.properties, o.order_id,"
                " o.amount - coalesce(r.amount, 0) AS amount\n"
                "FROM seg_orders o LEFT JOIN seg_refunds r"
                " ON r.profile_id = o.profile_id AND r.order_id = o.order_id\n"
                "WHERE NOT coalesce(r.full_refund OR r.amount >= o.amount, FALSE)",
            ),
        ]
    if "visits" in used:
        visit = settings.visit
        conds = []
        if visit.event_types:
            conds.append(f"type IN ({', '.join(params.add(t) for t in visit.event_types)})")
        if visit.include_purchases:
            conds.append(f"event = {params.add(purchase.event)}")
        steps.append(
            (
                "seg_visits",
                "SELECT profile_id, CAST(timestamp AS DATE) AS day, max(timestamp) AS timestamp\n"
                f"FROM seg_ev WHERE {' OR '.join(conds) or 'FALSE'} GROUP BY ALL",
            )
        )
    by_source: dict[str, list[_Agg]] = {}
    frequent: list[_Agg] = []
    for name, definition in definitions.items():
        agg = _aggregate(name, definition, params, now, today)
        if definition.aggregation == "most_frequent":
            frequent.append(agg)
        else:
            by_source.setdefault(definition.source, []).append(agg)
    joins: list[str] = []
    column_of: dict[str, str] = {}
    for source, aggs in by_source.items():
        alias = f"seg_agg_{source}"
        cols = ", ".join(f"{a.expr} AS {quote_ident(a.name)}" for a in aggs)
        steps.append(
            (alias, f"SELECT x.profile_id, {cols}\nFROM {_source_alias(source)} x GROUP BY ALL")
        )
        joins.append(f"LEFT JOIN {alias} ON {alias}.profile_id = p.profile_id")
        for a in aggs:
            column_of[a.name] = f"{alias}.{quote_ident(a.name)}"
    for i, a in enumerate(frequent):
        value, cond = a.value, a.condition
        counts, best = f"seg_mf{i}", f"seg_mfv{i}"
        steps.append(
            (
                counts,
                f"SELECT x.profile_id, {value} AS v, count(*) AS n\n"
                f"FROM {_source_alias(a.definition.source)} x WHERE {cond} GROUP BY ALL",
            )
        )
        steps.append(
            (best, f"SELECT profile_id, arg_min(v, (-n, v)) AS v FROM {counts} GROUP BY ALL")
        )
        joins.append(f"LEFT JOIN {best} ON {best}.profile_id = p.profile_id")
        column_of[a.name] = f"{best}.v"
    columns = []
    for name, definition in definitions.items():
        expr = column_of[name]
        if definition.aggregation in ("count", "count_distinct", "sum"):
            expr = f"coalesce({expr}, 0)"
        columns.append(f"CAST({expr} AS {SQL_TYPES[definition.value_type]}) AS {quote_ident(name)}")
    select = (
        f"SELECT p.profile_id, CAST({now_p} AS TIMESTAMP) AS computed_at"
        + "".join(f",\n  {c}" for c in columns)
        + "\nFROM profiles p\n"
        + "\n".join(joins)
    )
    # seg_ev is read by every source: materialised once so the events are scanned once.
    ctes = ",\n".join(
        f"{name} AS {'MATERIALIZED ' if name == 'seg_ev' else ''}(\n{sql}\n)" for name, sql in steps
    )
    return Query(f"WITH {ctes}\n{select}", params.values)


# Segment rules.

OPS_BY_TYPE: dict[FieldType, frozenset[str]] = {
    "string": frozenset({"eq", "neq", "in", "contains", "starts_with", "exists"}),
    "number": frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "between", "in", "exists"}),
    "integer": frozenset({"eq", "neq", "gt", "gte", "lt", "lte", "between", "in", "exists"}),
    "boolean": frozenset({"eq", "neq", "exists"}),
    "timestamp": frozenset(
        {
            "gt",
            "gte",
            "lt",
            "lte",
            "between",
            "exists",
            "in_last_days",
            "more_than_days_ago",
            "birthday_in_next_days",
        }
    ),
}
_SQL_OP = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _typed(value: object, ftype: FieldType, where: str) -> object:
    """Check one scalar value against a field type; returns the value to bind."""
    match ftype:
        case "string":
            if isinstance(value, str):
                return value
            raise InvalidRule(f"{where}: expected a string")
        case "number" | "integer":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return value
            raise InvalidRule(f"{where}: expected a number")
        case "boolean":
            if isinstance(value, bool):
                return value
            raise InvalidRule(f"{where}: expected true or false")
        case "timestamp":
            if isinstance(value, str):
                try:
                    parsed = datetime.fromisoformat(value)
                except ValueError:
                    pass
                else:
                    if parsed.tzinfo is not None:
                        parsed = parsed.astimezone(UTC).replace(tzinfo=None)
                    return parsed
            raise InvalidRule(f"{where}: expected an ISO 8601 date or timestamp")


def _days(value: object, where: str, *, maximum: int = 36500) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    raise InvalidRule(f"{where}: expected a whole number of days from 0 to {maximum}")


def birthday_codes(today: date, days: int) -> list[int]:
    """`month * 100 + day` of the days from today to today + days (29 Feb on 1 Mar if absent)."""
    codes: set[int] = set()
    for i in range(days + 1):
        d = today + timedelta(days=i)
        codes.add(d.month * 100 + d.day)
        leap = d.year % 4 == 0 and (d.year % 100 != 0 or d.year % 400 == 0)
        if d.month == 3 and d.day == 1 and not leap:
            codes.add(229)
    return sorted(codes)


def _comparison(
    expr: str, ftype: FieldType, op: str, value: object, params: Params, path: str, now: datetime
) -> str:
    """The SQL of `expr <op> value` for a value already known to be of the field's type."""
    where = f"{path}.value"
    if op not in OPS_BY_TYPE[ftype]:
        raise InvalidRule(f"{path}.op: {op} does not apply to a {ftype} field")
    match op:
        case "exists":
            if value is None or value is True:
                return f"{expr} IS NOT NULL"
            if value is False:
                return f"{expr} IS NULL"
            raise InvalidRule(f"{where}: expected true, false or nothing")
        case "eq" | "neq" | "gt" | "gte" | "lt" | "lte":
            return f"{expr} {_SQL_OP[op]} {params.add(_typed(value, ftype, where))}"
        case "between":
            if not isinstance(value, list) or len(value) != 2:
                raise InvalidRule(f"{where}: expected [low, high]")
            low = params.add(_typed(value[0], ftype, f"{where}[0]"))
            high = params.add(_typed(value[1], ftype, f"{where}[1]"))
            return f"{expr} BETWEEN {low} AND {high}"
        case "in":
            if not isinstance(value, list) or not value or len(value) > 10_000:
                raise InvalidRule(f"{where}: expected a non-empty list")
            items = [_typed(v, ftype, f"{where}[{i}]") for i, v in enumerate(value)]
            return f"list_contains({params.add(items)}, {expr})"
        case "contains" | "starts_with":
            return f"{op}({expr}, {params.add(_typed(value, ftype, where))})"
        case "in_last_days":
            cut = params.add(now - timedelta(days=_days(value, where)))
            return f"{expr} BETWEEN {cut} AND {params.add(now)}"
        case "more_than_days_ago":
            return f"{expr} < {params.add(now - timedelta(days=_days(value, where)))}"
        case "birthday_in_next_days":
            codes = birthday_codes(now.date(), _days(value, where, maximum=365))
            # The field expression is evaluated once (it may be a JSON extraction and a cast).
            return f"list_contains({params.add(codes)}, CAST(strftime({expr}, '%m%d') AS INTEGER))"
    raise InvalidRule(f"{path}.op: unknown operator {op}")  # unreachable: ops are a Literal


# The lambda parameter of comparisons on list elements (never a column name of ours).
_ELEM = "seg_elem"


def _path_condition(
    column: str,
    json_field: str,
    ftype: FieldType,
    op: str,
    value: object,
    params: Params,
    path: str,
    now: datetime,
) -> str:
    """A comparison on the value at a JSON path of a JSON column.

    Through list elements (`products[].category`) it holds when some element satisfies it;
    `exists: false` holds when no element has a value.
    """
    if not is_list_path(json_field):
        expr = _json_value(column, json_field, ftype, params)
        return _comparison(expr, ftype, op, value, params, path, now)
    values = f"json_extract_string({column}, {params.add(json_path(json_field))})"
    elem = _ELEM if ftype == "string" else f"TRY_CAST({_ELEM} AS {SQL_TYPES[ftype]})"
    cond = _comparison(elem, ftype, op, value, params, path, now)
    if op == "exists" and value is False:
        cond = f"{elem} IS NOT NULL"
    some = f"coalesce(list_bool_or(list_transform({values}, lambda {_ELEM}: {cond})), FALSE)"
    return f"(NOT {some})" if op == "exists" and value is False else some


def _property_filter(
    flt: PropertyFilter, column: str, ftype: FieldType, params: Params, path: str, now: datetime
) -> str:
    return _path_condition(column, flt.property, ftype, flt.op, flt.value, params, path, now)


SegmentResolver = Callable[[str], Rule | None]


def event_map_relation(event_profiles_sql: str) -> str:
    """The relation event conditions read, `(event, timestamp, event_id, profile_id)`, from an
    `(event_id, profile_id)` relation (identity's live one)."""
    return (
        "SELECT e.event, e.timestamp, r.event_id, r.profile_id\n"
        f"FROM ({event_profiles_sql}) r JOIN events e ON e.event_id = r.event_id\n"
        "WHERE e.event IS NOT NULL"
    )


@dataclass(frozen=True, slots=True)
class PropertyValues:
    """What `segment_property_values` holds: for each (event, path) of `marks`, the values of
    every event of that name with an id up to its mark."""

    marks: Mapping[tuple[str, str], int]


PROPERTY_VALUES_TABLE = "segment_property_values"


@dataclass(slots=True)
class _Context:
    catalog: Catalog
    params: Params
    now: datetime
    resolve_segment: SegmentResolver
    stack: list[str]
    sources: list[str] = field(default_factory=list)
    attributes: bool = False
    attribute_names: set[str] = field(default_factory=set)
    events: bool = False
    # The rule reads the clock (relative windows and dates) or other segments.
    volatile: bool = False
    # The rule reads columns of `profiles` (traits, profile fields).
    profile_columns: bool = False
    # The profile id column of the statement's base table.
    key: str = "p.profile_id"
    # Materialised property values event conditions may read (None: parse the JSON).
    values: PropertyValues | None = None
    # Whether some event condition filters on properties that `values` could answer.
    filters_properties: bool = False
    # Whether the rule being compiled is under a negation (`not`, `member: false`).
    negated: bool = False


def _field(ctx: _Context, spec: CatalogField) -> str:
    match spec.kind:
        case "profile":
            ctx.profile_columns = True
            return f"p.{quote_ident(spec.column)}"
        case "trait":
            ctx.profile_columns = True
            return _json_value("p.traits", spec.column, spec.type, ctx.params)
        case "attribute":
            ctx.attributes = True
            ctx.attribute_names.add(spec.column)
            return f"a.{quote_ident(spec.column)}"
        case "registered":
            assert spec.source is not None
            if spec.source not in ctx.sources:
                ctx.sources.append(spec.source)
            return f"{quote_ident('src_' + spec.source)}.{quote_ident(spec.column)}"


def _stored_condition(
    name: str,
    ftype: FieldType,
    flt: PropertyFilter,
    window: list[str],
    params: Params,
    path: str,
    now: datetime,
) -> str:
    """A property filter answered from `segment_property_values` for `ep.event_id`.

    The rows hold, per event, the text(s) `json_extract_string` gives at the path (one per
    list element, NULLs left out), so "some value satisfies the comparison" is exactly the
    JSON filter of `_path_condition`, and `exists: false` is "no value" (after the cast).
    """
    value = "v.value" if ftype == "string" else f"TRY_CAST(v.value AS {SQL_TYPES[ftype]})"
    negate = flt.op == "exists" and flt.value is False
    cond = (
        f"{value} IS NOT NULL"
        if negate
        else _comparison(value, ftype, flt.op, flt.value, params, path, now)
    )
    rows = " AND ".join(
        [
            f"v.path = {params.add(name)}",
            *(w.format(t="v") for w in window),
            cond,
        ]
    )
    sub = f"SELECT v.event_id FROM {PROPERTY_VALUES_TABLE} v WHERE {rows}"
    return f"ep.event_id {'NOT IN' if negate else 'IN'} ({sub})"


def _event_condition(ctx: _Context, rule: EventCondition, path: str) -> str:
    props = ctx.catalog.events.get(rule.event)
    if props is None:
        raise InvalidRule(f"{path}.event: unknown event {rule.event!r}")
    ctx.events = True
    params = ctx.params
    # The name and the window are read from the event map (sorted by event and time, so only
    # that event's rows in the window are scanned); with property filters, also from `events`
    # (so its scan prunes before the join).
    window = [f"{{t}}.event = {params.add(rule.event)}"]
    if rule.last_days is not None:
        ctx.volatile = True
        window.append(
            f"{{t}}.timestamp BETWEEN {params.add(ctx.now - timedelta(days=rule.last_days))}"
            f" AND {params.add(ctx.now)}"
        )
    if rule.since is not None:
        window.append(f"{{t}}.timestamp >= {params.add(rule.since)}")
    if rule.until is not None:
        window.append(f"{{t}}.timestamp < {params.add(rule.until)}")
    conds = [w.format(t="ep") for w in window]
    filters: list[tuple[str, FieldType, PropertyFilter, str]] = []
    for i, flt in enumerate(rule.where):
        where = f"{path}.where[{i}]"
        name = flt.property
        if name not in props and name.startswith("properties."):
            name = name.removeprefix("properties.")
        ftype = props.get(name)
        if ftype is None:
            raise InvalidRule(
                f"{where}.property: unknown property {flt.property!r} of event {rule.event!r}"
            )
        filters.append((name, ftype, flt, where))
    values = ctx.values
    if filters:
        ctx.filters_properties = True
    materialised = (
        values is not None
        and bool(filters)
        and all((rule.event, name) in values.marks for name, _, _, _ in filters)
    )
    json_conds = [
        _path_condition("e.properties", name, ftype, flt.op, flt.value, params, where, ctx.now)
        for name, ftype, flt, where in filters
    ]
    if materialised:
        assert values is not None
        # Events up to the mark: their materialised values; events after it: their JSON. With
        # several filters, the lowest of their paths' marks (each path is complete up to it).
        mark = params.add(min(values.marks[(rule.event, name)] for name, _, _, _ in filters))
        stored = [
            _stored_condition(name, ftype, flt, window, params, where, ctx.now)
            for name, ftype, flt, where in filters
        ]
        fresh = " AND ".join(
            [f"e.event_id > {mark}", *(w.format(t="e") for w in window), *json_conds]
        )
        conds.append(
            f"((ep.event_id <= {mark} AND {' AND '.join(stored)})"
            f" OR ep.event_id IN (SELECT e.event_id FROM events e WHERE {fresh}))"
        )
    elif filters:
        conds += [w.format(t="e") for w in window]
        conds += json_conds
    n = rule.count.value
    match rule.count.op:
        case "at_least" if n == 0:
            positive = "TRUE"
        case "at_least":
            positive = f"IN ({{q}} HAVING count(*) >= {params.add(n)})"
        case "at_most":
            positive = f"NOT IN ({{q}} HAVING count(*) > {params.add(n)})"
        case "exactly" if n == 0:
            positive = "NOT IN ({q})"
        case "exactly":
            positive = f"IN ({{q}} HAVING count(*) = {params.add(n)})"
    if positive == "TRUE":
        cond = "TRUE"
    else:
        source = (
            "seg_ep ep JOIN events e ON e.event_id = ep.event_id"
            if filters and not materialised
            else "seg_ep ep"
        )
        query = (
            f"SELECT ep.profile_id FROM {source} WHERE {' AND '.join(conds)} GROUP BY ep.profile_id"
        )
        cond = f"{ctx.key} " + positive.format(q=query)
    return cond if rule.performed else f"(NOT {cond})"


def _compile(ctx: _Context, rule: Rule, path: str, depth: int) -> str:
    if depth > MAX_DEPTH:
        raise InvalidRule(f"{path}: rules nest deeper than {MAX_DEPTH} levels")
    match rule:
        case AllOf(all=rules):
            parts = [_compile(ctx, r, f"{path}.all[{i}]", depth + 1) for i, r in enumerate(rules)]
            return "(" + " AND ".join(parts) + ")"
        case AnyOf(any=rules):
            parts = [_compile(ctx, r, f"{path}.any[{i}]", depth + 1) for i, r in enumerate(rules)]
            return "(" + " OR ".join(parts) + ")"
        case Not(not_=inner):
            return f"(NOT {_negated(ctx, inner, f'{path}.not', depth + 1)})"
        case Compare(field=name, op=op, value=value):
            spec = ctx.catalog.fields.get(name)
            if spec is None:
                raise InvalidRule(f"{path}.field: unknown field {name!r}")
            if op in _CLOCK_OPS:
                ctx.volatile = True
            if spec.kind == "trait":
                ctx.profile_columns = True
                sql = _path_condition(
                    "p.traits", spec.column, spec.type, op, value, ctx.params, path, ctx.now
                )
            else:
                sql = _comparison(
                    _field(ctx, spec), spec.type, op, value, ctx.params, path, ctx.now
                )
            # Under a negation a NULL must read as false; elsewhere the WHERE clause already
            # drops rows whose condition is NULL (so the bare comparison is the same, and
            # DuckDB can push it into the table scan).
            return f"coalesce({sql}, FALSE)" if ctx.negated else sql
        case EventCondition():
            return _event_condition(ctx, rule, path)
        case SegmentRef(segment=segment_id, member=member):
            if segment_id in ctx.stack:
                cycle = " -> ".join([*ctx.stack[ctx.stack.index(segment_id) :], segment_id])
                raise InvalidRule(f"{path}.segment: segments refer to each other ({cycle})")
            referenced = ctx.resolve_segment(segment_id)
            ctx.volatile = True  # the referenced segment's rule may change at any time
            if referenced is None:
                raise InvalidRule(f"{path}.segment: unknown segment {segment_id!r}")
            ctx.stack.append(segment_id)
            try:
                ref_path = f"{path}.segment({segment_id})"
                sql = (
                    _compile(ctx, referenced, ref_path, depth + 1)
                    if member
                    else _negated(ctx, referenced, ref_path, depth + 1)
                )
            finally:
                ctx.stack.pop()
            return sql if member else f"(NOT {sql})"
    raise InvalidRule(f"{path}: not a rule")  # unreachable: the union is closed


def _negated(ctx: _Context, rule: Rule, path: str, depth: int) -> str:
    """Compile a rule that will be negated: its comparisons must never be NULL."""
    outer = ctx.negated
    ctx.negated = True
    try:
        return _compile(ctx, rule, path, depth)
    finally:
        ctx.negated = outer


_CLOCK_OPS = frozenset({"in_last_days", "more_than_days_ago", "birthday_in_next_days"})
# The temporary table of profile ids an incremental refresh re-evaluates.
TOUCHED_TABLE = "seg_touched"


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A compiled rule and what an incremental refresh needs to know about it."""

    query: Query
    fingerprint: str  # changes whenever the condition's SQL or values change
    attributes: frozenset[str]  # computed attributes the rule compares
    # Whether a profile's result depends only on its own profile row, attributes and events
    # (no clock, no other segment, no registered relation): then only changed profiles need
    # re-evaluating.
    per_profile: bool


def compile_rule(
    rule: Rule,
    *,
    catalog: Catalog,
    now: datetime,
    event_profiles_sql: str | Callable[[], str],
    resolve_segment: SegmentResolver,
    segment_id: str | None = None,
    property_values: PropertyValues | None = None,
) -> Query:
    """One statement returning the `profile_id` of every profile the rule selects.

    `event_profiles_sql` (or a function giving it, called only if the rule has event
    conditions) is the `(event, timestamp, event_id, profile_id)` relation of the resolved
    events that have a name (`event_map_relation` of identity's `(event_id, profile_id)`).
    `segment_id` is the segment being saved, so references back to it are rejected as cycles.
    """
    return compile_rule_parts(
        rule,
        catalog=catalog,
        now=now,
        event_profiles_sql=event_profiles_sql,
        resolve_segment=resolve_segment,
        segment_id=segment_id,
        property_values=property_values,
    ).query


def compile_rule_parts(
    rule: Rule,
    *,
    catalog: Catalog,
    now: datetime,
    event_profiles_sql: str | Callable[[], str],
    resolve_segment: SegmentResolver,
    segment_id: str | None = None,
    touched_only: bool = False,
    attributes_current: bool | Callable[[], bool] = False,
    property_values: PropertyValues | None = None,
) -> CompiledRule:
    """`compile_rule` with what incremental refresh needs; `touched_only` restricts the
    statement (and its event scans) to the profiles of temp table `seg_touched`.

    `attributes_current` (or a function telling it, asked only when it matters): whether
    `profile_attributes` holds exactly the live profiles (refreshed since identity last ran);
    then a rule that reads no `profiles` column selects from `profile_attributes` alone.
    `property_values`: the materialised property values property filters may read instead of
    the events' JSON (same result either way).
    """
    stack = [segment_id] if segment_id else []
    ctx = _Context(catalog, Params(), now, resolve_segment, list(stack))
    condition = _compile(ctx, rule, "rule", 0)
    # Of the JSON form: the fingerprint does not move when the materialised values do.
    fingerprint_of = (condition, sorted(ctx.params.values.items(), key=str), ctx.sources)
    base = "profiles p"
    key = "p.profile_id"
    if ctx.attributes and not ctx.profile_columns:
        current = attributes_current() if callable(attributes_current) else attributes_current
        if current:
            key, base = "a.profile_id", "profile_attributes a"
    values = property_values if ctx.filters_properties else None
    if key != ctx.key or values is not None:
        ctx = _Context(catalog, Params(), now, resolve_segment, list(stack), key=key, values=values)
        condition = _compile(ctx, rule, "rule", 0)
    key = ctx.key
    touched = f"SELECT profile_id FROM {TOUCHED_TABLE}"
    lines = []
    if ctx.events:
        relation = event_profiles_sql() if callable(event_profiles_sql) else event_profiles_sql
        if touched_only:
            relation = f"SELECT * FROM (\n{relation}\n) WHERE profile_id IN ({touched})"
        lines.append(f"WITH seg_ep AS (\n{relation}\n)")
    lines.append(f"SELECT {key} FROM {base}")
    if ctx.attributes and base == "profiles p":
        lines.append("LEFT JOIN profile_attributes a ON a.profile_id = p.profile_id")
    for name in ctx.sources:
        alias = quote_ident("src_" + name)
        lines.append(
            f"LEFT JOIN (\n{ctx.catalog.sources[name].relation_sql}\n) {alias}"
            f" ON {alias}.profile_id = {key}"
        )
    if touched_only:
        lines.append(f"WHERE ({condition})\nAND {key} IN ({touched})")
    else:
        lines.append(f"WHERE {condition}")
    # Of the first compilation: the same whichever base table was chosen.
    digest = hashlib.sha256(repr(fingerprint_of).encode()).hexdigest()
    return CompiledRule(
        Query("\n".join(lines), ctx.params.values),
        digest,
        frozenset(ctx.attribute_names),
        not ctx.volatile and not ctx.sources,
    )


def dependencies(rule: Rule) -> set[str]:
    """The ids of the segments a rule refers to directly."""
    match rule:
        case AllOf(all=rules) | AnyOf(any=rules):
            return set().union(*(dependencies(r) for r in rules))
        case Not(not_=inner):
            return dependencies(inner)
        case SegmentRef(segment=segment_id):
            return {segment_id}
    return set()


def attribute_fields(rule: Rule) -> set[str]:
    """The attribute names a rule compares directly."""
    match rule:
        case AllOf(all=rules) | AnyOf(any=rules):
            return set().union(*(attribute_fields(r) for r in rules))
        case Not(not_=inner):
            return attribute_fields(inner)
        case Compare(field=name) if name.startswith("attributes."):
            return {name.removeprefix("attributes.")}
    return set()
