"""Privacy: erase a person (and keep them erased when data is re-sent), export, audit."""

from __future__ import annotations

from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service
from tests.conftest import make_key
from tests.identity.conftest import Ev, EventWriter, resolve


def _count(warehouse: Warehouse, sql: str) -> int:
    return int(warehouse.scalar(Query(sql)))


def test_erase_then_resend_does_not_rebuild_the_person_until_consent(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    person = [
        Ev([("email", "ana@x.com"), ("phone", "+33612345678")], traits={"name": "Ana"}),
        Ev([("email", "ana@x.com")], type="track", event="Order"),
    ]
    events.write([*person, Ev([("email", "bob@x.com")], traits={"name": "Bob"})])
    resolve(warehouse)
    ana = service.lookup(warehouse, kind="email", value="ana@x.com")
    admin = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}

    erased = client.delete(f"/api/profiles/{ana}", headers=admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["events_erased"] == 2
    assert erased.json()["identifiers_erased"] == 2
    assert _count(warehouse, "SELECT count(*) FROM events") == 1
    assert _count(warehouse, "SELECT count(*) FROM event_identifiers WHERE value LIKE 'ana%'") == 0
    assert _count(warehouse, "SELECT count(*) FROM profiles") == 1
    assert client.get(f"/api/profiles/{ana}", headers=admin).status_code == 404
    assert service.erasures_since(warehouse, after_seq=0)["profile_id"].to_list() == [ana]

    events.write(person)
    result = resolve(warehouse)
    assert result.new_profiles == 0
    assert service.lookup(warehouse, kind="email", value="ana@x.com") is None
    assert service.lookup(warehouse, kind="phone", value="+33612345678") is None
    assert _count(warehouse, "SELECT count(*) FROM events") == 1

    consent = client.post(
        "/api/identity/consents", json={"kind": "email", "value": "Ana@x.com"}, headers=admin
    )
    assert consent.status_code == 204, consent.text
    events.write([Ev([("email", "ana@x.com")], traits={"name": "Ana"})])
    resolve(warehouse)
    assert service.lookup(warehouse, kind="email", value="ana@x.com") is not None
    assert service.lookup(warehouse, kind="phone", value="+33612345678") is None

    audit = client.get("/api/identity/audit", headers=admin).json()
    assert sorted(a["action"] for a in audit["items"]) == ["consent", "erase"]


def test_export_returns_everything_held_and_is_audited(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "a@x.com")], traits={"city": "Lyon"}),
            Ev([("user_id", "u1")], type="track", event="Order", properties={"total": 12}),
        ]
    )
    resolve(warehouse)
    pid = service.lookup(warehouse, kind="user_id", value="u1")
    admin = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}
    marketer = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}
    assert client.get(f"/api/profiles/{pid}/export", headers=marketer).status_code == 403
    resp = client.get(f"/api/profiles/{pid}/export", headers=admin)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["profile"]["traits"] == {"city": "Lyon"}
    assert [e["event"] for e in body["events"]] == [None, "Order"]
    assert body["events"][1]["properties"] == {"total": 12}
    assert {(i["kind"], i["value"]) for i in body["identity"]["identifiers"]} == {
        ("user_id", "u1"),
        ("email", "a@x.com"),
    }
    audit = client.get("/api/identity/audit", headers=admin).json()
    assert [(a["action"], a["profile_id"]) for a in audit["items"]] == [("export", pid)]
    assert client.delete(f"/api/profiles/{pid}", headers=marketer).status_code == 403
