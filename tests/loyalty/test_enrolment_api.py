"""Explicit enrolment through the API names a person identity knows: a profile id it issued
(followed through merges) or an identifier it resolved."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service as identity_service
from loyalty import service
from tests.conftest import BACKENDS
from tests.loyalty.conftest import Profiles
from tests.loyalty.identity_data import profile_of, resolve, write_events

H = dict[str, str]
Json = dict[str, Any]  # Any: a JSON document


def _programme(client: TestClient, headers: H) -> str:
    answer = client.post(
        "/api/loyalty/programs", json={"name": "Club", "status": "active"}, headers=headers
    )
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _members(client: TestClient, headers: H, program_id: str, **params: str) -> list[Json]:
    url = f"/api/loyalty/programs/{program_id}/members"
    answer = client.get(url, params=params, headers=headers)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["items"])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_enrolling_a_profile_id_identity_never_issued_is_refused_and_creates_no_member(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    profiles("ann")
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    answer = client.post(url, json={"profile_id": "ann-typo"}, headers=loyalty_headers)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "loyalty.unknown_profile"
    assert "ann-typo" in error["message"]
    assert _members(client, loyalty_headers, program) == []
    # Leaving still answers as before: there is no such member.
    for action in ("unenrol", "opt_out"):
        left = client.post(
            url, json={"profile_id": "ann-typo", "action": action}, headers=loyalty_headers
        )
        assert left.status_code == 404, left.text
        assert left.json()["error"]["code"] == "loyalty.member_not_found"
    # An unknown programme is still a 404, whoever is named.
    missing = client.post(
        "/api/loyalty/programs/nope/members", json={"profile_id": "x"}, headers=loyalty_headers
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "loyalty.program_not_found"


def test_an_erased_profile_cannot_be_enrolled(
    client: TestClient, loyalty_headers: H, admin_headers: H, profiles: Profiles
) -> None:
    ids = profiles("ann", "bob")
    erased = client.delete(f"/api/profiles/{ids['ann']}", headers=admin_headers)
    assert erased.status_code == 200, erased.text
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    answer = client.post(url, json={"profile_id": ids["ann"]}, headers=loyalty_headers)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "loyalty.unknown_profile"
    assert "erased" in answer.json()["error"]["message"]
    assert _members(client, loyalty_headers, program) == []
    kept = client.post(url, json={"profile_id": ids["bob"]}, headers=loyalty_headers)
    assert kept.status_code == 200, kept.text


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_enrolling_a_merged_away_profile_id_enrols_its_survivor(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    # Two profiles: the web account and the newsletter email, then one event links them.
    write_events(warehouse, [([("user_id", "u-ann")], None, 0.0)])
    resolve(warehouse)
    write_events(warehouse, [([("email", "ann@example.com")], None, 0.0)])
    resolve(warehouse)
    before = {
        profile_of(warehouse, "user_id", "u-ann"),
        profile_of(warehouse, "email", "ann@example.com"),
    }
    assert len(before) == 2
    write_events(warehouse, [([("user_id", "u-ann"), ("email", "ann@example.com")], None, 0.0)])
    resolve(warehouse)
    survivor = profile_of(warehouse, "email", "ann@example.com")
    assert survivor == profile_of(warehouse, "user_id", "u-ann")
    [merged_away] = before - {survivor}
    assert identity_service.live_profile_ids(warehouse, profile_ids=[merged_away]) == [survivor]
    program = _programme(client, loyalty_headers)
    # Loyalty consumes the published merge before anyone enrols the old id.
    with db.begin() as session:
        applied, _ = service.sync_merges(session, warehouse, program_id=program)
    assert applied == 1

    url = f"/api/loyalty/programs/{program}/members"
    enrolled = client.post(url, json={"profile_id": merged_away}, headers=loyalty_headers)
    assert enrolled.status_code == 200, enrolled.text
    assert (enrolled.json()["profile_id"], enrolled.json()["status"]) == (survivor, "active")
    with db.begin() as session:
        assert service.sync_merges(session, warehouse, program_id=program) == (0, 0)
    assert [m["id"] for m in _members(client, loyalty_headers, program)] == [enrolled.json()["id"]]
    assert _members(client, loyalty_headers, program, profile_id=merged_away) == []
    # The survivor is the member now: enrolling either id again is a conflict, and leaving
    # by the old id acts on the survivor's membership.
    for profile_id in (merged_away, survivor):
        again = client.post(url, json={"profile_id": profile_id}, headers=loyalty_headers)
        assert again.status_code == 409, again.text
        assert again.json()["error"]["code"] == "loyalty.already_member"
    left = client.post(
        url, json={"profile_id": merged_away, "action": "opt_out"}, headers=loyalty_headers
    )
    assert left.status_code == 200, left.text
    assert (left.json()["id"], left.json()["profile_id"], left.json()["status"]) == (
        enrolled.json()["id"],
        survivor,
        "opted_out",
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_enrolling_by_identifier_finds_the_profile_holding_it_as_identity_normalises_it(
    warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    write_events(warehouse, [([("email", "ann@example.com")], None, 0.0)])
    write_events(warehouse, [([("phone", "+33612345678")], None, 0.0)])
    resolve(warehouse)
    ann = profile_of(warehouse, "email", "ann@example.com")
    bob = profile_of(warehouse, "phone", "+33612345678")
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    body = {"identifier_kind": "email", "identifier": "  ANN@Example.COM "}
    enrolled = client.post(url, json=body, headers=loyalty_headers)
    assert enrolled.status_code == 200, enrolled.text
    assert (enrolled.json()["profile_id"], enrolled.json()["status"]) == (ann, "active")
    assert [m["id"] for m in _members(client, loyalty_headers, program, profile_id=ann)] == [
        enrolled.json()["id"]
    ]
    # A phone typed nationally (default region FR), and leaving by identifier too.
    phone = {"identifier_kind": "phone", "identifier": "06 12 34 56 78"}
    bob_member = client.post(url, json=phone, headers=loyalty_headers)
    assert bob_member.status_code == 200, bob_member.text
    assert bob_member.json()["profile_id"] == bob
    left = client.post(url, json={**body, "action": "unenrol"}, headers=loyalty_headers)
    assert (left.json()["id"], left.json()["status"]) == (enrolled.json()["id"], "unenrolled")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_identifier_nobody_holds_is_refused_until_identity_resolves_it_then_the_same_key_enrols_once(  # noqa: E501
    warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    body = {"identifier_kind": "email", "identifier": "Bob@Example.com"}
    keyed = {**loyalty_headers, "Idempotency-Key": "enrol-bob"}
    early = client.post(url, json=body, headers=keyed)
    assert early.status_code == 422, early.text
    error = early.json()["error"]
    assert error["code"] == "loyalty.unknown_identifier"
    assert "bob@example.com" in error["message"]
    assert "not have resolved it yet" in error["message"]
    assert _members(client, loyalty_headers, program) == []
    # Identity resolves the sign-up; the client's retry with the same key now enrols...
    write_events(warehouse, [([("email", "bob@example.com")], None, 0.0)])
    resolve(warehouse)
    bob = profile_of(warehouse, "email", "bob@example.com")
    first = client.post(url, json=body, headers=keyed)
    assert first.status_code == 200, first.text
    assert first.json()["profile_id"] == bob
    # ...and a second retry replays that answer instead of answering "already a member".
    second = client.post(url, json=body, headers=keyed)
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert [m["id"] for m in _members(client, loyalty_headers, program)] == [first.json()["id"]]
    other = client.post(url, json={"profile_id": bob}, headers=keyed)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "loyalty.idempotency_key_reused"


def test_an_identifier_that_cannot_be_normalised_is_refused(
    client: TestClient, loyalty_headers: H
) -> None:
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    for kind, value in (("email", "not an address"), ("phone", "12"), ("loyalty_card", "   ")):
        answer = client.post(
            url, json={"identifier_kind": kind, "identifier": value}, headers=loyalty_headers
        )
        assert answer.status_code == 422, (kind, answer.text)
        assert answer.json()["error"]["code"] == "loyalty.invalid_identifier", kind


def test_the_person_is_named_by_profile_id_or_by_identifier_exactly_one_way(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    ann = profiles("ann")["ann"]
    program = _programme(client, loyalty_headers)
    url = f"/api/loyalty/programs/{program}/members"
    for body in (
        {"profile_id": ann, "identifier_kind": "user_id", "identifier": "ann"},
        {"profile_id": ann, "identifier": "ann"},
        {"profile_id": ann, "identifier_kind": "user_id"},
        {},
        {"action": "enrol"},
        {"identifier": "ann"},
        {"identifier_kind": "user_id"},
        {"identifier_kind": "User Id", "identifier": "ann"},
    ):
        answer = client.post(url, json=body, headers=loyalty_headers)
        assert answer.status_code == 422, (body, answer.text)
        assert answer.json()["error"]["code"] == "validation_error", body
    assert _members(client, loyalty_headers, program) == []
    by_user_id = {"identifier_kind": "user_id", "identifier": " ann "}
    enrolled = client.post(url, json=by_user_id, headers=loyalty_headers)
    assert enrolled.status_code == 200, enrolled.text
    assert enrolled.json()["profile_id"] == ann
