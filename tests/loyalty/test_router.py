"""Programmes, members, balances, history and adjustments through the HTTP API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from tests.conftest import BACKENDS, make_key
from tests.loyalty.conftest import Profiles, earn, make_member, make_program

H = dict[str, str]


def _program(client: TestClient, headers: H, **fields: Any) -> dict[str, Any]:  # Any: JSON
    body = {"name": "Club", "timezone": "Europe/Paris", **fields}
    resp = client.post("/api/loyalty/programs", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def _enrol(client: TestClient, headers: H, program_id: str, profile: str) -> dict[str, Any]:
    resp = client.post(
        f"/api/loyalty/programs/{program_id}/members",
        json={"profile_id": profile},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_programme_lifecycle_draft_active_paused_ended(
    client: TestClient, loyalty_headers: H
) -> None:
    created = _program(client, loyalty_headers, pending_days=30)
    assert created["status"] == "draft"
    url = f"/api/loyalty/programs/{created['id']}"
    for status in ("active", "paused", "active", "ended"):
        resp = client.patch(url, json={"status": status}, headers=loyalty_headers)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == status
    back = client.patch(url, json={"status": "active"}, headers=loyalty_headers)
    assert back.status_code == 409
    assert back.json()["error"]["code"] == "loyalty.invalid_status_change"
    listed = client.get("/api/loyalty/programs?status=ended", headers=loyalty_headers).json()
    assert [p["id"] for p in listed["items"]] == [created["id"]]
    assert client.get(url, headers=loyalty_headers).json()["pending_days"] == 30


def test_programme_settings_are_validated(client: TestClient, loyalty_headers: H) -> None:
    bad_zone = client.post(
        "/api/loyalty/programs", json={"name": "x", "timezone": "Nowhere"}, headers=loyalty_headers
    )
    assert bad_zone.status_code == 422
    assert bad_zone.json()["error"]["code"] == "loyalty.invalid_program"
    no_months = client.post(
        "/api/loyalty/programs",
        json={"name": "x", "expiry_policy": "rolling"},
        headers=loyalty_headers,
    )
    assert no_months.status_code == 422
    missing = client.get("/api/loyalty/programs/nope", headers=loyalty_headers)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "loyalty.program_not_found"


def test_enrol_unenrol_opt_out_and_lookup_by_profile(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    prof = profiles("prof-1")["prof-1"]
    program = _program(client, loyalty_headers, status="active")
    members_url = f"/api/loyalty/programs/{program['id']}/members"
    member = _enrol(client, loyalty_headers, program["id"], prof)
    again = client.post(members_url, json={"profile_id": prof}, headers=loyalty_headers)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "loyalty.already_member"
    left = client.post(
        members_url, json={"profile_id": prof, "action": "unenrol"}, headers=loyalty_headers
    ).json()
    assert (left["id"], left["status"]) == (member["id"], "unenrolled")
    back = _enrol(client, loyalty_headers, program["id"], prof)
    assert (back["id"], back["status"]) == (member["id"], "active")
    opted = client.post(
        members_url, json={"profile_id": prof, "action": "opt_out"}, headers=loyalty_headers
    ).json()
    assert opted["status"] == "opted_out"
    found = client.get(f"{members_url}?profile_id={prof}", headers=loyalty_headers).json()
    assert [m["id"] for m in found["items"]] == [member["id"]]
    none = client.get(f"{members_url}?profile_id=nobody", headers=loyalty_headers).json()
    assert none["items"] == []
    unknown = client.post(
        members_url, json={"profile_id": "nobody", "action": "unenrol"}, headers=loyalty_headers
    )
    assert unknown.status_code == 404


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_adjustment_with_idempotency_key_applies_once_and_replays_the_original(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program = _program(client, loyalty_headers, status="active")
    member = _enrol(client, loyalty_headers, program["id"], profiles("p")["p"])
    url = f"/api/loyalty/members/{member['id']}/adjustments"
    body = {"points": 150, "reason": "welcome gesture"}
    headers = {**loyalty_headers, "Idempotency-Key": "adj-1"}
    first = client.post(url, json=body, headers=headers)
    second = client.post(url, json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert first.json()["actor"].startswith("api-key:")
    assert first.json()["reason"] == "welcome gesture"
    reused = client.post(url, json={**body, "points": 1}, headers=headers)
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "loyalty.idempotency_key_reused"
    balance = client.get(f"/api/loyalty/members/{member['id']}/balance", headers=loyalty_headers)
    assert balance.json()["active"] == 150
    assert balance.json()["qualifying_points"] == 0
    debit = client.post(
        url,
        json={"points": -200, "reason": "oops"},
        headers={**loyalty_headers, "Idempotency-Key": "adj-2"},
    )
    assert debit.status_code == 409
    assert debit.json()["error"]["code"] == "loyalty.insufficient_points"
    retried = client.post(
        url,
        json={"points": -100, "reason": "correction"},
        headers={**loyalty_headers, "Idempotency-Key": "adj-2"},
    )
    assert retried.status_code == 201, "a failed request does not burn its key"
    history = client.get(
        f"/api/loyalty/members/{member['id']}/history", headers=loyalty_headers
    ).json()
    assert [(e["kind"], e["points"]) for e in history["items"]] == [
        ("adjust", -100),
        ("adjust", 150),
    ]


def test_programme_creation_with_the_same_key_creates_one_programme(
    client: TestClient, loyalty_headers: H
) -> None:
    headers = {**loyalty_headers, "Idempotency-Key": "create-club"}
    ids = {
        client.post("/api/loyalty/programs", json={"name": "Club"}, headers=headers).json()["id"]
        for _ in range(3)
    }
    assert len(ids) == 1
    assert client.get("/api/loyalty/programs", headers=loyalty_headers).json()["total"] == 1


def test_adjustment_needs_a_reason(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program = _program(client, loyalty_headers, status="active")
    member = _enrol(client, loyalty_headers, program["id"], profiles("p")["p"])
    resp = client.post(
        f"/api/loyalty/members/{member['id']}/adjustments",
        json={"points": 5},
        headers=loyalty_headers,
    )
    assert resp.status_code == 422


def test_loyalty_routes_refuse_viewer_and_marketer_keys(client: TestClient, db: Database) -> None:
    for role in (Role.viewer, Role.marketer):
        headers = {"Authorization": f"Bearer {make_key(db, role)}"}
        assert client.get("/api/loyalty/programs", headers=headers).status_code == 403


def test_history_is_in_the_order_things_happened_and_shows_released_points_active(
    db: Database, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db, pending_days=7)
    member = make_member(db, program)
    now = datetime.now(UTC)
    day = timedelta(days=1)
    # Each written when it happened, but the oldest one written last (a late file).
    earn(db, program, member, 10, at=now - 9 * day, key="middle", now=now - 9 * day)
    earn(db, program, member, 20, at=now - day, key="recent", now=now - day)
    earn(db, program, member, 50, at=now - 30 * day, key="old", now=now - day / 2)
    history = client.get(
        f"/api/loyalty/members/{member.id}/history", headers=loyalty_headers
    ).json()
    assert [(e["points"], e["status"]) for e in history["items"]] == [
        (20, "pending"),  # spendable in 6 days
        (10, "active"),  # written pending, released 2 days ago
        (50, "active"),
    ]
