"""What activating a programme does with the events loaded before it (`earn_history`)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from cdp.warehouse import Warehouse
from tests.loyalty.identity_data import resolve, write_events

H = dict[str, str]


def _order(warehouse: Warehouse, user: str, total: float) -> None:
    write_events(warehouse, [([("user_id", user)], "Order Completed", total)])
    resolve(warehouse)


def _programme(client: TestClient, headers: H, **fields: object) -> str:
    made = client.post(
        "/api/loyalty/programs",
        json={"name": "Club", "enrolment": "automatic", **fields},
        headers=headers,
    )
    assert made.status_code == 201, made.text
    program_id = str(made.json()["id"])
    rule = client.post(
        f"/api/loyalty/programs/{program_id}/rules",
        json={
            "name": "1 pt per euro",
            "event_name": "Order Completed",
            "formula": {"type": "per_amount", "rate": 1},
        },
        headers=headers,
    )
    assert rule.status_code == 201, rule.text
    return program_id


def _sync(client: TestClient, headers: H, program_id: str) -> int:
    answer = client.post(f"/api/loyalty/programs/{program_id}/sync", headers=headers)
    assert answer.status_code == 200, answer.text
    return int(answer.json()["points"])


def _status(client: TestClient, headers: H, program_id: str, status: str) -> None:
    answer = client.patch(
        f"/api/loyalty/programs/{program_id}", json={"status": status}, headers=headers
    )
    assert answer.status_code == 200, answer.text


def test_by_default_activation_earns_on_the_history_already_loaded(
    client: TestClient, warehouse: Warehouse, loyalty_headers: H
) -> None:
    _order(warehouse, "ann", 40)
    program_id = _programme(client, loyalty_headers, status="active")
    assert _sync(client, loyalty_headers, program_id) == 40


def test_without_earn_history_only_events_loaded_while_active_earn_in_real_time(
    client: TestClient, warehouse: Warehouse, loyalty_headers: H
) -> None:
    _order(warehouse, "ann", 40)  # before the programme
    program_id = _programme(client, loyalty_headers, earn_history=False)
    _order(warehouse, "bob", 15)  # while it is a draft
    _status(client, loyalty_headers, program_id, "active")
    assert _sync(client, loyalty_headers, program_id) == 0
    _order(warehouse, "cat", 25)
    assert _sync(client, loyalty_headers, program_id) == 25
    _status(client, loyalty_headers, program_id, "paused")
    _order(warehouse, "dan", 7)  # during the pause
    _status(client, loyalty_headers, program_id, "active")
    _order(warehouse, "eve", 3)
    assert _sync(client, loyalty_headers, program_id) == 3
    # The history is still there for an explicit backfill: the three orders not yet earned.
    backfill = client.post(f"/api/loyalty/programs/{program_id}/backfill", headers=loyalty_headers)
    assert backfill.status_code == 200, backfill.text
    assert backfill.json()["credits"] == 3


def test_a_programme_created_active_without_earn_history_starts_at_the_present(
    client: TestClient, warehouse: Warehouse, loyalty_headers: H
) -> None:
    _order(warehouse, "ann", 40)
    program_id = _programme(client, loyalty_headers, status="active", earn_history=False)
    read = client.get(f"/api/loyalty/programs/{program_id}", headers=loyalty_headers).json()
    assert read["earn_history"] is False
    assert read["last_event_id"] == 1
    assert _sync(client, loyalty_headers, program_id) == 0
