"""Bad input and edge states through the loyalty HTTP API: clear 4xx answers, never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRunner
from cdp.warehouse import Warehouse
from identity import service as identity_service
from loyalty import jobs
from tests.loyalty.conftest import Profiles
from tests.loyalty.identity_data import profile_of, resolve, write_events

H = dict[str, str]
Json = dict[str, Any]  # Any: JSON bodies
HUGE = 10**20  # beyond a 64-bit integer


def _post(client: TestClient, url: str, body: Json, headers: H, status: int = 200) -> Json:
    answer = client.post(url, json=body, headers=headers)
    assert answer.status_code == status, answer.text
    return dict(answer.json())


def _programme(client: TestClient, headers: H, **fields: object) -> str:
    body = {"name": "Club", "status": "active", **fields}
    return str(_post(client, "/api/loyalty/programs", body, headers, 201)["id"])


def _programme_with_ann(client: TestClient, headers: H, profiles: Profiles) -> tuple[str, str]:
    """An active programme and the member id of a real profile enrolled in it."""
    program_id = _programme(client, headers)
    ann = profiles("ann")["ann"]
    members = f"/api/loyalty/programs/{program_id}/members"
    return program_id, str(_post(client, members, {"profile_id": ann}, headers)["id"])


def _per_euro(client: TestClient, headers: H, program_id: str) -> None:
    rule = {
        "name": "1 pt per euro",
        "event_name": "Order Completed",
        "formula": {"type": "per_amount"},
    }
    _post(client, f"/api/loyalty/programs/{program_id}/rules", rule, headers, 201)


def test_an_order_amount_too_large_for_points_earns_nothing_and_does_not_stop_processing(
    client: TestClient, warehouse: Warehouse, loyalty_headers: H
) -> None:
    program_id = _programme(client, loyalty_headers, enrolment="automatic")
    _per_euro(client, loyalty_headers, program_id)
    write_events(
        warehouse,
        [
            ([("user_id", "ann")], "Order Completed", 1e25),
            ([("user_id", "ann")], "Order Completed", 0),
            ([("user_id", "bob")], "Order Completed", 40),
        ],
        properties=[{}, {"total": "Infinity"}, {}],
    )
    resolve(warehouse)
    synced = _post(client, f"/api/loyalty/programs/{program_id}/sync", {}, loyalty_headers)
    assert synced["points"] == 40
    backfill = _post(client, f"/api/loyalty/programs/{program_id}/backfill", {}, loyalty_headers)
    # The backfill goes over the same events without failing; the sync wrote their points.
    assert backfill["events"] == 3
    assert backfill["points"] == 0
    dry = _post(
        client,
        f"/api/loyalty/programs/{program_id}/dry-run",
        {"event": {"event": "Order Completed", "properties": {"total": 1e25}}},
        loyalty_headers,
    )
    assert dry["total_points"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("members/{member}/adjustments", {"points": HUGE, "reason": "by hand"}),
        ("members/{member}/adjustments", {"points": -HUGE, "reason": "by hand"}),
        ("programs/{program}/rewards", {"name": "r", "points_cost": HUGE}),
        ("programs/{program}/rewards", {"name": "r", "points_cost": 10, "stock": HUGE}),
        ("programs/{program}/rewards", {"name": "r", "points_cost": 10, "per_member_limit": HUGE}),
        ("programs/{program}/tiers", {"name": "t", "rank": HUGE, "threshold": 1}),
        ("programs/{program}/rules", {"priority": HUGE}),
        ("programs/{program}/rules", {"budget": HUGE}),
        ("programs/{program}/rules", {"cap_per_day": HUGE}),
        ("programs/{program}/rules", {"limit_per_member": HUGE}),
        ("programs/{program}/rules", {"formula": {"type": "fixed", "points": HUGE}}),
    ],
)
def test_numbers_beyond_what_the_ledger_stores_are_refused_with_422(
    client: TestClient, loyalty_headers: H, profiles: Profiles, path: str, body: Json
) -> None:
    program_id, member_id = _programme_with_ann(client, loyalty_headers, profiles)
    if path.endswith("rules"):
        body = {"name": "r", "event_name": "E", "formula": {"type": "fixed", "points": 1}, **body}
    url = "/api/loyalty/" + path.format(program=program_id, member=member_id)
    answer = client.post(url, json=body, headers={**loyalty_headers, "Idempotency-Key": "k"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "validation_error"


def test_a_redemption_is_cancelled_without_a_body(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program_id, member_id = _programme_with_ann(client, loyalty_headers, profiles)
    adjustment = {"points": 100, "reason": "welcome"}
    _post(client, f"/api/loyalty/members/{member_id}/adjustments", adjustment, loyalty_headers, 201)
    reward = {"name": "Coffee", "points_cost": 60}
    reward_id = _post(
        client, f"/api/loyalty/programs/{program_id}/rewards", reward, loyalty_headers, 201
    )["id"]
    redemption = _post(
        client,
        f"/api/loyalty/members/{member_id}/redemptions",
        {"reward_id": reward_id},
        {**loyalty_headers, "Idempotency-Key": "r-1"},
        201,
    )
    cancelled = client.post(
        f"/api/loyalty/redemptions/{redemption['id']}/cancel", headers=loyalty_headers
    )
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    unknown = client.post("/api/loyalty/redemptions/nope/cancel", headers=loyalty_headers)
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "loyalty.redemption_not_found"


def test_unknown_filter_values_of_member_and_ledger_lists_are_refused(
    client: TestClient, loyalty_headers: H, profiles: Profiles
) -> None:
    program_id, member_id = _programme_with_ann(client, loyalty_headers, profiles)
    members = f"/api/loyalty/programs/{program_id}/members"
    for url in (f"{members}?status=activ", f"/api/loyalty/members/{member_id}/history?kind=eran"):
        answer = client.get(url, headers=loyalty_headers)
        assert answer.status_code == 422, answer.text
    history = f"/api/loyalty/members/{member_id}/history?kind=adjust"
    assert client.get(history, headers=loyalty_headers).status_code == 200


def test_an_erased_member_is_listed_and_read_with_status_erased(
    db: Database,
    warehouse: Warehouse,
    settings: Settings,
    client: TestClient,
    loyalty_headers: H,
) -> None:
    program_id = _programme(client, loyalty_headers, enrolment="automatic")
    _per_euro(client, loyalty_headers, program_id)
    write_events(warehouse, [([("email", "ann@example.com")], "Order Completed", 30)])
    resolve(warehouse)
    _post(client, f"/api/loyalty/programs/{program_id}/sync", {}, loyalty_headers)
    with db.begin() as session:
        identity_service.erase_profile(
            session,
            warehouse,
            profile_id=profile_of(warehouse, "email", "ann@example.com"),
            actor="dpo",
        )
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    assert runner.run("loyalty.apply_merges", trigger="manual").status == "succeeded"
    runner.shutdown()
    listed = client.get(f"/api/loyalty/programs/{program_id}/members", headers=loyalty_headers)
    assert listed.status_code == 200, listed.text
    [member] = listed.json()["items"]
    assert member["status"] == "erased"
    one = client.get(f"/api/loyalty/members/{member['id']}", headers=loyalty_headers)
    assert one.status_code == 200, one.text
    erased = client.get(
        f"/api/loyalty/programs/{program_id}/members?status=erased", headers=loyalty_headers
    )
    assert erased.json()["total"] == 1
