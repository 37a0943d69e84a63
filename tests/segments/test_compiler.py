"""The rule language and its compiler: paths in errors, SQL snapshots, inert hostile values."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

import pytest

from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from segments.compiler import (
    PROPERTY_VALUES_TABLE,
    PropertyValues,
    birthday_codes,
    compile_rule,
    event_map_relation,
)
from segments.errors import InvalidRule
from segments.fields import (
    FieldSource,
    build_catalog,
    register_field_source,
    unregister_field_source,
)
from segments.rules import Rule, parse_rule
from tests.segments.conftest import NOW

EP = "SELECT event, timestamp, event_id, profile_id FROM stub_ep"


def _catalog() -> Any:  # Any: the Catalog, built fresh for each test
    return build_catalog(
        traits={"country": "string", "age": "number", "birthday": "timestamp", "vip": "boolean"},
        attributes={"orders_count": "integer", "last_purchase_at": "timestamp"},
        events={"Order Completed": {"category": "string", "revenue": "number"}},
    )


def _compile(
    rule: Any, segments: dict[str, Any] | None = None, segment_id: str | None = None
) -> Query:  # Any: JSON
    known = {k: parse_rule(v) for k, v in (segments or {}).items()}
    return compile_rule(
        parse_rule(rule),
        catalog=_catalog(),
        now=NOW,
        event_profiles_sql=EP,
        resolve_segment=known.get,
        segment_id=segment_id,
    )


def _error(rule: Any, **kwargs: Any) -> str:  # Any: JSON and compile options
    with pytest.raises(InvalidRule) as caught:
        _compile(rule, **kwargs)
    assert caught.value.status_code == 422
    return caught.value.message


def test_snapshot_of_traits_and_attributes_comparisons() -> None:
    query = _compile(
        {
            "all": [
                {"field": "traits.country", "op": "in", "value": ["FR", "DE"]},
                {"field": "attributes.orders_count", "op": "gte", "value": 2},
            ]
        }
    )
    assert query.sql == (
        "SELECT p.profile_id FROM profiles p\n"
        "LEFT JOIN profile_attributes a ON a.profile_id = p.profile_id\n"
        # No negation above: a NULL comparison already drops the row (no coalesce, so DuckDB
        # can push the comparison into the scan).
        "WHERE (list_contains($p1, json_extract_string(p.traits, $p0))"
        ' AND a."orders_count" >= $p2)'
    )
    assert query.params == {"p0": "$.country", "p1": ["FR", "DE"], "p2": 2}


def test_comparisons_under_a_negation_are_never_null(warehouse: Warehouse) -> None:
    """`member: false` and `not` (at any depth) keep the coalesce: a profile without the
    trait is outside "vip" and so inside "not vip"."""
    vip = {"field": "traits.vip", "op": "eq", "value": True}
    warehouse.execute(
        Query(
            "INSERT INTO profiles VALUES ('p1', now()::TIMESTAMP, now()::TIMESTAMP, NULL, NULL,"
            " 0, '{}', '{\"country\": \"FR\"}')"
        )
    )
    for rule in (
        {"segment": "s1", "member": False},
        {"not": {"all": [{"any": [vip]}]}},
        {"not": {"segment": "s1"}},
    ):
        query = _compile(rule, segments={"s1": vip})
        assert "NOT coalesce(" in query.sql or "(NOT ((coalesce(" in query.sql, query.sql
        assert warehouse.rows(query) == [("p1",)], rule
    assert warehouse.rows(_compile(vip)) == []


def test_snapshot_of_not_and_birthday() -> None:
    query = _compile(
        {
            "any": [
                {"not": {"field": "traits.vip", "op": "eq", "value": True}},
                {"field": "traits.birthday", "op": "birthday_in_next_days", "value": 7},
            ]
        }
    )
    birthday = "TRY_CAST(json_extract_string(p.traits, $p2) AS TIMESTAMP)"
    assert query.sql == (
        "SELECT p.profile_id FROM profiles p\n"
        "WHERE ((NOT coalesce(TRY_CAST(json_extract_string(p.traits, $p0) AS BOOLEAN) = $p1,"
        f" FALSE)) OR list_contains($p3, CAST(strftime({birthday}, '%m%d') AS INTEGER)))"
    )
    assert query.params == {
        "p0": "$.vip",
        "p1": True,
        "p2": "$.birthday",
        "p3": [615, 616, 617, 618, 619, 620, 621, 622],
    }


def test_snapshot_of_event_conditions() -> None:
    query = _compile(
        {
            "all": [
                {
                    "event": "Order Completed",
                    "where": [{"property": "category", "op": "eq", "value": "shoes"}],
                    "count": {"op": "at_least", "value": 2},
                    "last_days": 90,
                },
                {
                    "event": "Order Completed",
                    "performed": False,
                    "since": "2026-01-01T01:00:00+01:00",
                },
            ]
        }
    )
    joined = "SELECT ep.profile_id FROM seg_ep ep JOIN events e ON e.event_id = ep.event_id WHERE "
    alone = "SELECT ep.profile_id FROM seg_ep ep WHERE "
    assert query.sql == (
        f"WITH seg_ep AS (\n{EP}\n)\n"
        "SELECT p.profile_id FROM profiles p\n"
        f"WHERE (p.profile_id IN ({joined}ep.event = $p0 AND ep.timestamp BETWEEN $p1 AND $p2"
        " AND e.event = $p0 AND e.timestamp BETWEEN $p1 AND $p2"
        " AND json_extract_string(e.properties, $p3) = $p4 GROUP BY ep.profile_id"
        " HAVING count(*) >= $p5)"
        f" AND (NOT p.profile_id IN ({alone}ep.event = $p0 AND ep.timestamp >= $p6"
        " GROUP BY ep.profile_id HAVING count(*) >= $p7)))"
    )
    assert query.params == {
        "p0": "Order Completed",
        "p1": datetime(2026, 3, 17, 12),
        "p2": NOW,
        "p3": "$.category",
        "p4": "shoes",
        "p5": 2,
        "p6": datetime(2026, 1, 1, 0, 0),  # converted to naive UTC
        "p7": 1,
    }


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {
                "all": [
                    {"field": "traits.country", "op": "eq", "value": "FR"},
                    {"field": "traits.age", "op": "gt", "value": 3},
                    {"any": [{"field": "traits.age", "op": "gt", "value": "old"}]},
                ]
            },
            "rule.all[2].any[0].value: expected a number",
        ),
        (
            {"any": [{"field": "traits.nope", "op": "eq", "value": 1}]},
            "rule.any[0].field: unknown field",
        ),
        (
            {"all": [{"field": "traits.country", "op": "gt", "value": "A"}]},
            "rule.all[0].op: gt does not apply to a string field",
        ),
        (
            {"not": {"field": "traits.vip", "op": "eq", "value": "yes"}},
            "rule.not.value: expected true or false",
        ),
        (
            {"field": "traits.age", "op": "between", "value": [1]},
            "rule.value: expected [low, high]",
        ),
        (
            {"field": "traits.age", "op": "in", "value": [1, "2"]},
            "rule.value[1]: expected a number",
        ),
        (
            {"field": "attributes.last_purchase_at", "op": "gt", "value": "yesterday"},
            "rule.value: expected an ISO 8601",
        ),
        (
            {"field": "attributes.last_purchase_at", "op": "in_last_days", "value": -1},
            "rule.value: expected a whole number",
        ),
        ({"event": "Nope"}, "rule.event: unknown event 'Nope'"),
        (
            {
                "all": [
                    {
                        "event": "Order Completed",
                        "where": [{"property": "size", "op": "eq", "value": 1}],
                    }
                ]
            },
            "rule.all[0].where[0].property: unknown property 'size'",
        ),
        (
            {
                "event": "Order Completed",
                "where": [{"property": "revenue", "op": "eq", "value": "x"}],
            },
            "rule.where[0].value: expected a number",
        ),
        ({"segment": "missing"}, "rule.segment: unknown segment 'missing'"),
    ],
)
def test_invalid_rules_name_the_offending_path(rule: Any, message: str) -> None:  # Any: JSON
    assert _error(rule).startswith(message)


@pytest.mark.parametrize(
    ("rule", "path"),
    [
        ({"all": [{"field": "traits.age", "op": "bogus", "value": 1}]}, "rule.all[0].op"),
        ({"all": [{"any": [{"nothing": 1}]}]}, "rule.all[0].any[0]"),
        ({"not": {"all": []}}, "rule.not.all"),
        (
            {"any": [{"event": "x", "count": {"op": "at_least", "value": -1}}]},
            "rule.any[0].count.value",
        ),
        (
            {"all": [{"field": "traits.age", "op": "eq", "value": 1, "extra": 2}]},
            "rule.all[0].extra",
        ),
        ({"segment": "s", "member": "perhaps"}, "rule.member"),
    ],
)
def test_malformed_rules_name_the_offending_path(rule: Any, path: str) -> None:  # Any: JSON
    with pytest.raises(InvalidRule) as caught:
        parse_rule(rule)
    assert caught.value.message.split(":")[0] == path


def test_segment_references_are_inlined_and_cycles_rejected() -> None:
    segments = {
        "a": {"field": "traits.country", "op": "eq", "value": "FR"},
        "b": {"all": [{"segment": "a"}, {"field": "traits.age", "op": "lt", "value": 30}]},
        "c": {"segment": "d"},
        "d": {"any": [{"segment": "c"}]},
    }
    query = _compile({"segment": "b", "member": False}, segments)
    assert "NOT" in query.sql
    assert query.params["p1"] == "FR"
    assert _error({"segment": "c"}, segments=segments).startswith(
        "rule.segment(c).segment(d).any[0].segment: segments refer to each other (c -> d -> c)"
    )
    # Saving `a` with a rule that reaches `a` again through `b` is a cycle too.
    assert "(a -> b -> a)" in _error({"segment": "b"}, segments=segments, segment_id="a")


def test_deep_nesting_is_refused_not_crashing() -> None:
    rule: dict[str, Any] = {"field": "traits.age", "op": "gt", "value": 1}  # Any: JSON
    for _ in range(80):
        rule = {"not": rule}
    assert "nest deeper than" in _error(rule)


HOSTILE = "x'); DROP TABLE profiles; --"
HOSTILE_DQ = 'x"); DROP TABLE profiles; --'


def _hostile_rules() -> Iterator[tuple[str, Rule]]:
    for value in (HOSTILE, HOSTILE_DQ):
        yield "eq", parse_rule({"field": "traits.country", "op": "eq", "value": value})
        yield "neq", parse_rule({"field": "traits.country", "op": "neq", "value": value})
        yield "in", parse_rule({"field": "traits.country", "op": "in", "value": ["FR", value]})
        yield "contains", parse_rule({"field": "traits.country", "op": "contains", "value": value})
        yield "starts", parse_rule({"field": "traits.country", "op": "starts_with", "value": value})
        yield (
            "event_where",
            parse_rule(
                {
                    "event": "Order Completed",
                    "where": [{"property": "category", "op": "eq", "value": value}],
                }
            ),
        )
        yield (
            "event_in",
            parse_rule(
                {
                    "event": "Order Completed",
                    "where": [{"property": "category", "op": "in", "value": [value]}],
                }
            ),
        )


def test_hostile_values_in_every_string_position_are_bound_parameters(
    warehouse: Warehouse,
) -> None:
    tables_before = warehouse.rows(Query("SELECT count(*) FROM duckdb_tables()"))
    # Property filters both from the events' JSON and from the materialised values.
    materialised = PropertyValues({("Order Completed", "category"): 0})
    for (name, rule), values in itertools.product(_hostile_rules(), (None, materialised)):
        query = compile_rule(
            rule,
            catalog=_catalog(),
            now=NOW,
            event_profiles_sql=event_map_relation(identity_service.event_profile_sql()),
            resolve_segment=lambda _: None,
            property_values=values,
        )
        assert "DROP" not in query.sql, name
        if name.startswith("event") and values is not None:
            assert PROPERTY_VALUES_TABLE in query.sql, name
        assert any(HOSTILE in str(v) or HOSTILE_DQ in str(v) for v in query.params.values()), name
        assert warehouse.rows(Query(f"SELECT count(*) FROM ({query.sql})", query.params)) == [(0,)]
    assert warehouse.rows(Query("SELECT count(*) FROM duckdb_tables()")) == tables_before


@pytest.mark.parametrize(
    "rule",
    [
        {"field": f"traits.{HOSTILE}", "op": "exists"},
        {"field": HOSTILE, "op": "exists"},
        {"event": HOSTILE},
        {"segment": "x'); DROP"},
        {"event": "Order Completed", "where": [{"property": HOSTILE, "op": "exists"}]},
        {"field": "traits.country", "op": HOSTILE, "value": 1},
    ],
)
def test_hostile_names_are_rejected_before_any_sql(rule: Any) -> None:  # Any: JSON
    with pytest.raises(InvalidRule):
        _compile(rule)


def test_hostile_trait_keys_in_the_data_never_reach_the_catalogue(warehouse: Warehouse) -> None:
    from segments import service

    warehouse.execute(
        Query(
            "INSERT INTO profiles VALUES ('p1', now()::TIMESTAMP, now()::TIMESTAMP, NULL, NULL, 0,"
            " '{}', json_object($k, 1, 'fine', 2, 'deep', json_object($k, 3, 'ok', [4])))",
            {"k": HOSTILE},
        )
    )
    service.refresh_catalog(warehouse)
    traits = warehouse.rows(Query("SELECT path FROM segment_trait_catalog ORDER BY path"))
    assert traits == [("deep",), ("deep.ok",), ("deep.ok[]",), ("fine",)]


def test_registered_fields_join_their_relation_without_importing_their_package(
    warehouse: Warehouse,
) -> None:
    register_field_source(
        FieldSource(
            name="loyalty",
            relation_sql="SELECT 'p1' AS profile_id, 'gold' AS tier, 120 AS balance",
            fields={"tier": "string", "balance": "integer"},
            description="test source",
        )
    )
    try:
        catalog = _catalog()
        assert catalog.fields["loyalty.tier"].type == "string"
        query = compile_rule(
            parse_rule(
                {
                    "all": [
                        {"field": "loyalty.tier", "op": "eq", "value": "gold"},
                        {"field": "loyalty.balance", "op": "gte", "value": 100},
                    ]
                }
            ),
            catalog=catalog,
            now=NOW,
            event_profiles_sql=EP,
            resolve_segment=lambda _: None,
        )
    finally:
        unregister_field_source("loyalty")
    assert "LEFT JOIN (\nSELECT 'p1' AS profile_id" in query.sql
    assert '"src_loyalty"."tier" = $p0' in query.sql
    warehouse.execute(
        Query(
            "INSERT INTO profiles VALUES ('p1', now()::TIMESTAMP, now()::TIMESTAMP, NULL, NULL, 0,"
            " '{}', '{}'), ('p2', now()::TIMESTAMP, now()::TIMESTAMP, NULL, NULL, 0, '{}', '{}')"
        )
    )
    assert warehouse.rows(query) == [("p1",)]
    assert "loyalty.tier" not in _catalog().fields
    with pytest.raises(ValueError, match="not allowed"):
        register_field_source(FieldSource("traits", "SELECT 1", {}))


def test_birthday_window_wraps_the_year_and_keeps_29_february() -> None:
    assert birthday_codes(date(2026, 12, 30), 3) == [101, 102, 1230, 1231]
    assert 229 in birthday_codes(date(2027, 2, 27), 3)
    assert 229 in birthday_codes(date(2028, 2, 27), 3)
