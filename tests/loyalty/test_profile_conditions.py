"""Conditions over the member's profile (traits, computed attributes, segment membership)
earn through the real paths: real-time sync and backfill read the profile data from the
warehouse, and the dry run explains them with an existing member's stored profile."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import engine, service
from loyalty.models import LedgerEntry, Member, Program
from loyalty.schemas import ProgramUpdate, RuleCreate
from segments import service as segments_service
from tests.loyalty.conftest import make_program
from tests.loyalty.identity_data import french_segment, profile_of, resolve, write_events

PEOPLE = ("ann", "bob", "cara")


def _email(name: str) -> tuple[str, str]:
    return ("email", f"{name}@example.com")


def _programme(db: Database, name: str, rules: list[dict[str, Any]]) -> Program:  # Any: JSON
    """An automatic-enrolment programme with these rules (on `Order Completed` by default)."""
    program = make_program(db, name=name, enrolment="automatic")
    with db.begin() as session:
        for i, rule in enumerate(rules):
            body = {"name": f"rule {i}", "event_name": "Order Completed", **rule}
            service.create_rule(session, program_id=program.id, data=RuleCreate(**body))
    return program


def _points(db: Database, program: Program, warehouse: Warehouse) -> dict[str, int]:
    """Points earned per person (by email) in the programme."""
    names = {profile_of(warehouse, *_email(n)): n for n in PEOPLE}
    with db.begin() as session:
        rows = session.execute(
            select(Member.profile_id, func.sum(LedgerEntry.points))
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(LedgerEntry.program_id == program.id)
            .group_by(Member.profile_id)
        ).all()
    return {names[str(p)]: int(points) for p, points in rows}


def _sync_and_backfill(
    db: Database, warehouse: Warehouse, rules: list[dict[str, Any]]
) -> tuple[dict[str, int], dict[str, int]]:  # Any: JSON
    """The points of one programme synced in real time and of another backfilled."""
    synced = _programme(db, "synced", rules)
    backfilled = _programme(db, "backfilled", rules)
    with db.begin() as session:
        service.sync_program(session, warehouse, program_id=synced.id)
        service.backfill(session, warehouse, program_id=backfilled.id)
    return _points(db, synced, warehouse), _points(db, backfilled, warehouse)


def _people(warehouse: Warehouse, traits: list[dict[str, object] | None]) -> None:
    """Ann, Bob and Cara sign up with these traits, then each completes a 10.0 order."""
    write_events(warehouse, [([_email(n)], "Signed Up", 0) for n in PEOPLE], traits=traits)
    write_events(warehouse, [([_email(n)], "Order Completed", 10) for n in PEOPLE])
    resolve(warehouse)


VIP = {"field": "traits.vip", "op": "eq", "value": True}


def test_sync_and_backfill_read_the_profiles_traits(db: Database, warehouse: Warehouse) -> None:
    _people(warehouse, [{"vip": True}, {"vip": False}, None])
    rules: list[dict[str, Any]] = [  # Any: JSON
        {"condition": VIP, "formula": {"type": "fixed", "points": 50}},
        {"condition": {"not": VIP}, "formula": {"type": "fixed", "points": 5}},
    ]
    synced, backfilled = _sync_and_backfill(db, warehouse, rules)
    # Only Ann is a VIP; the negated rule is for the others only.
    assert synced == backfilled == {"ann": 50, "bob": 5, "cara": 5}


def test_sync_and_backfill_read_the_computed_attributes(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    write_events(
        warehouse,
        [
            ([_email("ann")], "Order Completed", 150),
            ([_email("bob")], "Order Completed", 40),
            *[([_email(n)], "Review Submitted", 0) for n in PEOPLE],
        ],
    )
    resolve(warehouse)
    with db.begin() as session:
        segments_service.refresh_attributes(session, warehouse, settings=settings.segments)
    review: dict[str, Any] = {"event_name": "Review Submitted"}  # Any: JSON
    rules = [
        {
            **review,
            "condition": {"field": "attributes.spend_total", "op": "gte", "value": 100},
            "formula": {"type": "fixed", "points": 10},
        },
        # Timestamps compare as ISO text: Ann bought at 10:01, Bob at 10:02 (not before).
        {
            **review,
            "condition": {
                "field": "attributes.first_purchase_at",
                "op": "lt",
                "value": "2026-03-02T10:02:00",
            },
            "formula": {"type": "fixed", "points": 3},
        },
        # An attribute no refresh computed has no value: the comparison is false.
        {
            **review,
            "condition": {"field": "attributes.never_computed", "op": "exists"},
            "formula": {"type": "fixed", "points": 1000},
        },
    ]
    synced, backfilled = _sync_and_backfill(db, warehouse, rules)
    assert synced == backfilled == {"ann": 13}


def test_sync_and_backfill_award_a_segments_members_only(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    _people(warehouse, [{"country": "FR"}, {"country": "DE"}, None])
    french = french_segment(db, warehouse, settings)
    rules: list[dict[str, Any]] = [  # Any: JSON
        {"condition": {"segment": french}, "formula": {"type": "fixed", "points": 20}},
        {
            "condition": {"segment": french, "member": False},
            "formula": {"type": "fixed", "points": 1},
        },
    ]
    synced, backfilled = _sync_and_backfill(db, warehouse, rules)
    assert synced == backfilled == {"ann": 20, "bob": 1, "cara": 1}


def test_only_the_profile_data_the_rules_read_is_loaded(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    _people(warehouse, [{"vip": True, "country": "FR"}, None, None])
    french = french_segment(db, warehouse, settings)
    ann = profile_of(warehouse, *_email("ann"))
    program = _programme(
        db, "club", [{"condition": {"segment": french}, "formula": {"type": "fixed", "points": 1}}]
    )
    with db.begin() as session:
        specs = engine.active_rules(session, program_id=program.id)
    loader = service.profile_loader(warehouse, specs=specs)
    assert loader is not None
    assert loader([ann, "unknown"]).to_dicts() == [
        {"profile_id": ann, f"segment:{french}": True},
        {"profile_id": "unknown", f"segment:{french}": False},
    ]
    plain = _programme(db, "plain", [{"formula": {"type": "per_amount"}}])
    with db.begin() as session:
        plain_specs = engine.active_rules(session, program_id=plain.id)
    assert service.profile_loader(warehouse, specs=plain_specs) is None


def test_a_rule_naming_an_unknown_segment_or_attribute_is_refused(
    db: Database, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    url = f"/api/loyalty/programs/{program.id}/rules"
    rule = {"name": "r", "event_name": "Order Completed", "formula": {"type": "fixed", "points": 1}}
    unknown = client.post(
        url, json={**rule, "condition": {"not": {"segment": "no-such"}}}, headers=loyalty_headers
    )
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["error"]["message"] == (
        "invalid condition: no saved segment 'no-such'"
        " (a segment condition names a saved segment by its id)"
    )
    created = client.post(url, json=rule, headers=loyalty_headers)
    assert created.status_code == 201, created.text
    changed = client.patch(
        f"/api/loyalty/rules/{created.json()['id']}",
        json={"condition": {"segment": "no-such"}},
        headers=loyalty_headers,
    )
    assert changed.status_code == 422, changed.text
    assert "no saved segment 'no-such'" in changed.json()["error"]["message"]
    bad_name = client.post(
        url,
        json={**rule, "condition": {"field": "attributes.Spend.total", "value": 1}},
        headers=loyalty_headers,
    )
    assert bad_name.status_code == 422, bad_name.text


def test_a_segment_or_attribute_a_rule_reads_cannot_be_deleted(
    db: Database, client: TestClient, admin_headers: dict[str, str]
) -> None:
    body = {"name": "views", "definition": {"aggregation": "count", "events": ["Product Viewed"]}}
    assert client.post("/api/attributes", json=body, headers=admin_headers).status_code == 201
    made = client.post(
        "/api/segments",
        json={"name": "Browsers", "rule": {"field": "loyalty.enrolled", "op": "eq", "value": True}},
        headers=admin_headers,
    )
    assert made.status_code == 201, made.text
    segment_id = made.json()["id"]
    other = client.post(
        "/api/segments",
        json={"name": "Other", "rule": {"field": "loyalty.tier", "op": "eq", "value": "Gold"}},
        headers=admin_headers,
    )
    program = make_program(db, name="Club")
    with db.begin() as session:
        for name, condition in (
            ("browsers", {"segment": segment_id}),
            ("viewers", {"not": {"field": "attributes.views", "op": "lt", "value": 3}}),
        ):
            rule = {"name": name, "event_name": "Order Completed", "condition": condition}
            service.create_rule(
                session,
                program_id=program.id,
                data=RuleCreate(**rule, formula={"type": "fixed", "points": 5}),
            )

    refused = client.delete(f"/api/segments/{segment_id}", headers=admin_headers)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == {
        "code": "segments.segment_conflict",
        "message": "segment Browsers is used by loyalty_rules: Club / browsers",
        "details": {"loyalty_rules": ["Club / browsers"]},
    }
    refused = client.delete("/api/attributes/views", headers=admin_headers)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["message"] == (
        "attribute views is used by loyalty_rules: Club / viewers"
    )
    # A segment no rule reads is deleted as before.
    assert (
        client.delete(f"/api/segments/{other.json()['id']}", headers=admin_headers).status_code
        == 204
    )

    # Once the programme has ended its rules no longer hold anything.
    with db.begin() as session:
        service.update_program(session, program_id=program.id, data=ProgramUpdate(status="ended"))
    assert client.delete(f"/api/segments/{segment_id}", headers=admin_headers).status_code == 204
    assert client.delete("/api/attributes/views", headers=admin_headers).status_code == 204


def test_dry_run_reads_an_existing_members_stored_profile(
    db: Database,
    warehouse: Warehouse,
    settings: Settings,
    client: TestClient,
    loyalty_headers: dict[str, str],
) -> None:
    _people(warehouse, [{"vip": True, "country": "FR"}, None, None])
    french = french_segment(db, warehouse, settings)
    rules = [
        {"name": "vip", "condition": VIP, "formula": {"type": "fixed", "points": 50}},
        {
            "name": "french",
            "condition": {"segment": french},
            "formula": {"type": "fixed", "points": 20},
        },
    ]
    program = _programme(db, "club", rules)
    with db.begin() as session:
        service.sync_program(session, warehouse, program_id=program.id)
        ann = service.member_by_profile(
            session, program_id=program.id, profile_id=profile_of(warehouse, *_email("ann"))
        )
    url = f"/api/loyalty/programs/{program.id}/dry-run"
    event = {"event": "Order Completed", "properties": {"total": 10}}

    def verdicts(member: dict[str, Any]) -> dict[str, Any]:  # Any: JSON
        resp = client.post(url, json={"event": event, "member": member}, headers=loyalty_headers)
        assert resp.status_code == 200, resp.text
        return {v["name"]: v for v in resp.json()["rules"]}

    stored = verdicts({"member_id": ann.id})
    assert (stored["vip"]["points"], stored["french"]["points"]) == (50, 20)
    assert stored["vip"]["condition"]["actual"] == "true"
    assert stored["french"]["condition"] == {
        "segment": french,
        "member": True,
        "actual": True,
        "result": True,
    }
    # What the request gives replaces the stored profile.
    given = verdicts({"member_id": ann.id, "traits": {"vip": False}, "segments": []})
    assert (given["vip"]["reason"], given["french"]["reason"]) == ("condition is false",) * 2
    described = verdicts({"segments": [french]})
    assert (described["vip"]["points"], described["french"]["points"]) == (0, 20)
