"""The compile's marks (package state and identity's profiles version) are read once and reused
while nothing is written to the warehouse; any write makes the next compile read them again."""

from __future__ import annotations

from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Warehouse
from segments import service
from segments.fields import FieldSource, register_field_source, unregister_field_source
from tests.segments.conftest import NOW, Ev, resolve, write_events

RULE = {"field": "attributes.orders_count", "op": "gte", "value": 1}


def _members(db: Database, warehouse: Warehouse) -> set[str]:
    with db.begin() as session:
        query = service.compile_segment_rule(
            session, warehouse, rule=service.parse_rule(RULE), settings=SegmentsSettings(), now=NOW
        )
    return {str(r[0]) for r in warehouse.rows(query)}


def test_marks_are_reused_until_a_write_and_results_follow_identity(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(warehouse, [Ev("u1", "Order Completed", properties={"revenue": 10})])
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_derived(session, warehouse, settings=SegmentsSettings(), now=NOW)
    first = service._marks_and_watermark(warehouse)
    assert service._marks_and_watermark(warehouse) is first  # nothing written: no query
    assert len(_members(db, warehouse)) == 1
    assert service._marks_and_watermark(warehouse) is first

    # A new buyer resolved by identity: the profiles version moves, the attributes are not
    # current any more, and the compiled rule sees the new profile (with no attributes yet).
    write_events(warehouse, [Ev("u2", "Order Completed", properties={"revenue": 5})])
    resolve(warehouse)
    again = service._marks_and_watermark(warehouse)
    assert again is not first
    assert service._warehouse_fields(warehouse).watermark != next(
        str(t) for n, t, _ in first if n is None
    )
    assert len(_members(db, warehouse)) == 1
    with db.begin() as session:
        service.refresh_derived(session, warehouse, settings=SegmentsSettings(), now=NOW)
    assert len(_members(db, warehouse)) == 2


def test_the_compile_catalogue_is_reused_until_fields_or_sources_change(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(
        warehouse, [Ev("u1", "Order Completed", properties={"revenue": 10}, traits={"city": "x"})]
    )
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_derived(session, warehouse, settings=SegmentsSettings(), now=NOW)
    fields = service._warehouse_fields(warehouse)
    built = service._compile_catalog(fields)
    assert service._compile_catalog(service._warehouse_fields(warehouse)) is built
    assert "traits.city" in built.fields

    # A registered source appears at once, and is gone once removed.
    register_field_source(FieldSource("extra", "SELECT NULL AS profile_id", {"score": "number"}))
    try:
        with_source = service._compile_catalog(service._warehouse_fields(warehouse))
        assert "extra.score" in with_source.fields
    finally:
        unregister_field_source("extra")
    assert "extra.score" not in service._compile_catalog(fields).fields

    # A new trait rebuilds the warehouse fields, and with them the catalogue.
    write_events(warehouse, [Ev("u2", "Signed Up", traits={"plan": "gold"})])
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_derived(session, warehouse, settings=SegmentsSettings(), now=NOW)
    assert "traits.plan" in service._compile_catalog(service._warehouse_fields(warehouse)).fields
