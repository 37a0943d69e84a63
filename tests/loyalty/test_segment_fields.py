"""Loyalty's fields in the segment catalogue: rules on `loyalty.tier`, `loyalty.balance`, ..."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from loyalty import service
from loyalty.schemas import TierCreate
from tests.conftest import make_key
from tests.loyalty.conftest import add_base_rule, make_program
from tests.loyalty.identity_data import profile_of, resolve, write_events


def _audience(client: TestClient, headers: dict[str, str], rule: Any) -> set[str]:  # Any: rule
    response = client.post(
        "/api/segments/preview", json={"rule": rule, "sample_size": 100}, headers=headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["count"] == len(body["sample"])
    return {s["profile_id"] for s in body["sample"]}


def test_segment_rule_on_loyalty_tier_selects_the_gold_members(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    # Registered at import; again here in case a test unregistered the source meanwhile.
    service.register_segment_fields()
    program = make_program(db, enrolment="automatic")
    with db.begin() as session:
        add_base_rule(session, program)
        service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Silver", rank=1, threshold=0)
        )
        service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Gold", rank=2, threshold=100)
        )
    write_events(
        warehouse,
        [
            ([("email", "ann@example.com")], "Order Completed", 150),
            ([("email", "bob@example.com")], "Order Completed", 40),
            ([("email", "cara@example.com")], "Order Completed", 60),
            ([("email", "cara@example.com")], "Order Completed", 45),
            ([("email", "dan@example.com")], "Page Viewed", 0),
        ],
    )
    resolve(warehouse)
    ann, bob, cara, dan = (
        profile_of(warehouse, "email", f"{n}@example.com") for n in ("ann", "bob", "cara", "dan")
    )
    synced = client.post(f"/api/loyalty/programs/{program.id}/sync", headers=loyalty_headers)
    assert synced.status_code == 200, synced.text
    marketer = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}

    gold = {"field": "loyalty.tier", "op": "eq", "value": "Gold"}
    assert _audience(client, marketer, gold) == {ann, cara}
    silver = {"field": "loyalty.tier", "op": "eq", "value": "Silver"}
    assert _audience(client, marketer, silver) == {bob}
    rich = {"field": "loyalty.balance", "op": "gte", "value": 100}
    assert _audience(client, marketer, rich) == {ann, cara}
    enrolled = {"field": "loyalty.enrolled", "op": "eq", "value": True}
    assert _audience(client, marketer, enrolled) == {ann, bob, cara}
    not_gold = {"not": gold}
    assert _audience(client, marketer, not_gold) == {bob, dan}

    # Bob leaves: the next publication says so.
    with db.begin() as session:
        bob_member = service.member_by_profile(session, program_id=program.id, profile_id=bob)
        service.change_membership(
            session, program_id=program.id, profile_id=bob_member.profile_id, action="unenrol"
        )
        service.publish_member_snapshot(session, warehouse)
    assert _audience(client, marketer, enrolled) == {ann, cara}
    published = warehouse.rows(
        Query("SELECT profile_id, balance FROM loyalty_member_snapshot ORDER BY balance")
    )
    assert published == [(bob, 40), (cara, 105), (ann, 150)]


def test_catalogue_lists_the_loyalty_fields(
    db: Database, client: TestClient, admin_headers: dict[str, str]
) -> None:
    service.register_segment_fields()
    response = client.get("/api/segments/catalog", headers=admin_headers)
    assert response.status_code == 200
    text = response.text
    for field in ("loyalty.tier", "loyalty.balance", "loyalty.enrolled", "loyalty.enrolled_at"):
        assert field in text
