"""The profile API shows the computed attributes segments keeps, wired by the composition root."""

from __future__ import annotations

from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service
from tests.conftest import make_key
from tests.identity.conftest import Ev, EventWriter, resolve


def test_profile_shows_its_computed_attributes_after_a_refresh(
    db: Database, warehouse: Warehouse, client: TestClient, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("email", "ann@example.com")], type="track", event="Order Completed",
               properties={"order_id": "o1", "total": 30}),
            Ev([("email", "ann@example.com"), ("anonymous_id", "dev-1")], type="track",
               event="Order Completed", properties={"order_id": "o2", "total": 12}),
            Ev([("anonymous_id", "dev-1")], type="track", event="Order Completed",
               properties={"order_id": "o3", "total": 8}),
            Ev([("email", "bob@example.com")], type="track", event="Order Completed",
               properties={"order_id": "o4", "total": 5}),
        ]
    )  # fmt: skip
    resolve(warehouse)
    ann = service.lookup(warehouse, kind="email", value="ann@example.com")
    assert ann is not None
    reader = {"Authorization": f"Bearer {make_key(db, Role.data)}"}
    marketer = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}

    before = client.get(f"/api/profiles/{ann}", headers=reader)
    assert before.status_code == 200
    assert before.json()["attributes"] is None
    assert client.post("/api/attributes/refresh", headers=marketer).status_code == 200

    body = client.get(f"/api/profiles/{ann}", headers=reader).json()
    # Three orders tied to ann (one only through the device she logged in on).
    assert body["attributes"]["orders_count"] == 3
    assert body["attributes"]["computed_at"] is not None
    by_email = client.get(
        "/api/profiles/lookup", params={"kind": "email", "value": "BOB@example.com"}, headers=reader
    ).json()
    assert by_email["attributes"]["orders_count"] == 1
