"""The profile and identity HTTP API, through the real app."""

from __future__ import annotations

from datetime import datetime

from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service
from identity.rules import IdentityRules
from tests.conftest import make_key
from tests.identity.conftest import Ev, EventWriter, resolve


def _headers(db: Database, role: Role) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(db, role)}"}


def test_lookup_normalises_the_value_and_returns_the_profile(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("email", "ana@x.com"), ("phone", "+33612345678")], traits={"name": "Ana"})])
    resolve(warehouse)
    headers = _headers(db, Role.marketer)
    resp = client.get(
        "/api/profiles/lookup", params={"kind": "email", "value": " Ana@X.com "}, headers=headers
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["identifiers"] == {"email": ["ana@x.com"], "phone": ["+33612345678"]}
    assert body["traits"] == {"name": "Ana"}
    phone = client.get(
        "/api/profiles/lookup", params={"kind": "phone", "value": "06 12 34 56 78"}, headers=headers
    )
    assert phone.json()["id"] == body["id"]
    missing = client.get(
        "/api/profiles/lookup", params={"kind": "email", "value": "nobody@x.com"}, headers=headers
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "identity.identifier_not_found"
    bad = client.get(
        "/api/profiles/lookup", params={"kind": "phone", "value": "abc"}, headers=headers
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "identity.invalid_identifier"


def test_merged_away_id_answers_with_the_survivor(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("email", "a@x.com")]), Ev([("anonymous_id", "z")])])
    resolve(warehouse)
    old = service.lookup(warehouse, kind="email", value="a@x.com")
    young = service.lookup(warehouse, kind="anonymous_id", value="z")
    events.write([Ev([("email", "a@x.com"), ("anonymous_id", "z")])])
    resolve(warehouse)
    resp = client.get(f"/api/profiles/{young}", headers=_headers(db, Role.marketer))
    assert resp.status_code == 200
    assert resp.json()["id"] == old
    assert resp.json()["requested_id"] == young
    assert resp.json()["redirected"] is True
    unknown = client.get("/api/profiles/nope", headers=_headers(db, Role.marketer))
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "identity.profile_not_found"


def test_timeline_is_paginated_and_filtered(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1")], type="track", event="Order", at=datetime(2026, 1, d))
            for d in range(1, 6)
        ]
        + [Ev([("user_id", "u1")], type="track", event="View", at=datetime(2026, 1, 9))]
        + [Ev([("user_id", "u2")], type="track", event="Order")]
    )
    resolve(warehouse)
    pid = service.lookup(warehouse, kind="user_id", value="u1")
    headers = _headers(db, Role.marketer)
    first = client.get(f"/api/profiles/{pid}/events", params={"limit": 4}, headers=headers)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["total"] == 6
    assert [e["event"] for e in body["items"]] == ["View", "Order", "Order", "Order"]
    assert body["next_offset"] == 4
    orders = client.get(
        f"/api/profiles/{pid}/events",
        params={"event": "Order", "since": "2026-01-02T00:00:00Z", "until": "2026-01-04T00:00:00Z"},
        headers=headers,
    ).json()
    assert [e["timestamp"][:10] for e in orders["items"]] == ["2026-01-03", "2026-01-02"]
    assert orders["total"] == 2


def test_timeline_holds_the_events_whose_most_trusted_identifier_is_the_profiles(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    # The device joins u1 (first seen with it); u2 may not join them (one user id per
    # profile), so the event carrying u2 and the device is u2's, not u1's, though it shares
    # an identifier with u1's profile.
    events.write(
        [
            Ev([("user_id", "u1"), ("anonymous_id", "a")], type="track", event="Signed In"),
            Ev([("anonymous_id", "a")], type="page"),
            Ev([("user_id", "u2"), ("anonymous_id", "a")], type="track", event="Order"),
        ]
    )
    resolve(warehouse)
    u1 = service.lookup(warehouse, kind="user_id", value="u1")
    u2 = service.lookup(warehouse, kind="user_id", value="u2")
    assert u1 != u2
    headers = _headers(db, Role.marketer)
    mine = client.get(f"/api/profiles/{u1}/events", headers=headers).json()
    theirs = client.get(f"/api/profiles/{u2}/events", headers=headers).json()
    assert sorted(e["type"] for e in mine["items"]) == ["page", "track"]
    assert [e["event"] for e in mine["items"] if e["type"] == "track"] == ["Signed In"]
    assert (mine["total"], [e["event"] for e in theirs["items"]]) == (2, ["Order"])


def test_identity_explains_links_merges_and_refusals(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("user_id", "u1"), ("email", "s@x.com")]), Ev([("anonymous_id", "a")])])
    resolve(warehouse)
    (linking, refused) = events.write(
        [
            Ev([("anonymous_id", "a"), ("email", "s@x.com")]),
            Ev([("user_id", "u2"), ("email", "s@x.com")]),
        ]
    )
    resolve(warehouse)
    pid = service.lookup(warehouse, kind="user_id", value="u1")
    body = client.get(f"/api/profiles/{pid}/identity", headers=_headers(db, Role.marketer)).json()
    assert {(i["kind"], i["value"]) for i in body["identifiers"]} == {
        ("user_id", "u1"),
        ("email", "s@x.com"),
        ("anonymous_id", "a"),
    }
    used = {(link["event_id"], link["used"]) for link in body["links"]}
    assert (linking, True) in used
    assert (refused, False) in used
    assert [h["kind"] for h in body["history"]] == ["merge"]
    assert body["history"][0]["event_id"] == linking
    assert [d["decision"] for d in body["decisions"]] == ["limit"]
    assert body["decisions"][0]["event_id"] == refused


def test_search_profiles_by_trait(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", f"u{i}")], traits={"city": "Paris" if i % 2 else "Lyon", "n": i})
            for i in range(7)
        ]
    )
    resolve(warehouse)
    headers = _headers(db, Role.marketer)
    resp = client.get("/api/profiles", params={"trait": "city:Paris", "limit": 2}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["total"] == 3
    assert len(resp.json()["items"]) == 2
    both = client.get(
        "/api/profiles", params=[("trait", "city:Paris"), ("trait", "n:3")], headers=headers
    ).json()
    assert [p["identifiers"]["user_id"] for p in both["items"]] == [["u3"]]
    bad = client.get("/api/profiles", params={"trait": "city"}, headers=headers)
    assert bad.status_code == 400


def test_rules_round_trip_and_apply_on_next_resolution(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    headers = _headers(db, Role.data)
    rules = client.get("/api/identity/rules", headers=headers).json()
    assert rules["limits"]["user_id"] == 1
    rules["limits"] = {"email": 1}
    saved = client.put("/api/identity/rules", json=rules, headers=headers)
    assert saved.status_code == 200, saved.text
    assert client.get("/api/identity/rules", headers=headers).json()["limits"] == {"email": 1}
    bad = client.put(
        "/api/identity/rules", json={**rules, "blocked_patterns": ["("]}, headers=headers
    )
    assert bad.status_code == 422
    events.write([Ev([("device_id", "d"), ("email", "a@x.com"), ("email", "b@x.com")])])
    run = client.post("/api/identity/resolve", headers=_headers(db, Role.admin))
    assert run.status_code == 200, run.text
    assert run.json()["refused_links"] == 2  # a-b, then d-b once d holds a
    assert client.get("/api/identity/rules", headers=_headers(db, Role.marketer)).status_code == 403


def test_identity_and_export_explain_links_to_blocked_and_capped_identifiers(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "unknown"), ("phone", "+33600000001")]),
            Ev([("user_id", "u2"), ("phone", "+33600000001")]),
        ]
    )
    resolve(warehouse, IdentityRules(auto_cap=1))
    pid = service.lookup(warehouse, kind="user_id", value="u1")
    resp = client.get(f"/api/profiles/{pid}/identity", headers=_headers(db, Role.marketer))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ends = {
        (frozenset({(x["from_kind"], x["from_value"]), (x["to_kind"], x["to_value"])}), x["used"])
        for x in body["links"]
    }
    assert ends == {
        (frozenset({("user_id", "u1"), ("email", "unknown")}), False),
        (frozenset({("user_id", "u1"), ("phone", "+33600000001")}), False),
    }
    assert {(d["decision"], d["kind"], d["value"]) for d in body["decisions"]} == {
        ("blocked", "email", "unknown"),
        ("capped", "phone", "+33600000001"),
    }
    export = client.get(f"/api/profiles/{pid}/export", headers=_headers(db, Role.admin))
    assert export.status_code == 200, export.text
    assert export.json()["identity"]["links"] == body["links"]


def test_rules_reject_a_pattern_that_re2_cannot_run_and_name_it(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    headers = _headers(db, Role.data)
    rules = client.get("/api/identity/rules", headers=headers).json()
    for pattern in [r"(?!x).*@spam\.com", r"(a)\1@x\.com"]:
        bad = client.put(
            "/api/identity/rules",
            json={**rules, "blocked_patterns": [r".*@ok\.com", pattern]},
            headers=headers,
        )
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"]["code"] == "identity.invalid_rules"
        assert pattern in bad.json()["error"]["message"]
    assert client.get("/api/identity/rules", headers=headers).json() == rules
    events.write([Ev([("user_id", "u1"), ("email", "a@spam.com")])])
    run = client.post("/api/identity/resolve", headers=_headers(db, Role.admin))
    assert run.status_code == 200, run.text


def test_search_profiles_by_trait_keys_that_look_like_json_paths(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    traits = {"$y": "z", "/x": "y", "a.b": "x", '"q\\': "w", "$": "d"}
    events.write([Ev([("user_id", "u1")], traits=traits), Ev([("user_id", "u2")])])
    resolve(warehouse)
    headers = _headers(db, Role.marketer)
    for key, value in traits.items():
        resp = client.get("/api/profiles", params={"trait": f"{key}:{value}"}, headers=headers)
        assert resp.status_code == 200, (key, resp.text)
        assert resp.json()["total"] == 1, key
        assert resp.json()["items"][0]["identifiers"] == {"user_id": ["u1"]}
    nested = client.get("/api/profiles", params={"trait": "$.a:x"}, headers=headers)
    assert nested.json()["total"] == 0


def test_blocked_lists_blocked_and_capped_identifiers_with_why(
    client: TestClient, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    phone = "+33600000001"
    events.write(
        [
            Ev([("user_id", "u0"), ("phone", phone), ("email", "unknown")]),
            Ev([("user_id", "u1"), ("phone", phone)]),
            Ev([("user_id", "u2"), ("phone", phone)]),
            Ev([("user_id", "u3"), ("email", "noreply@shop.com")]),
            *[Ev([("user_id", f"v{i}"), ("email", "UNKNOWN")]) for i in range(4)],
            Ev([("user_id", "v0"), ("email", "unknown")]),
        ]
    )
    headers = _headers(db, Role.data)
    rules = IdentityRules(auto_cap=2)
    saved = client.put("/api/identity/rules", json=rules.model_dump(), headers=headers)
    assert saved.status_code == 200, saved.text
    resolve(warehouse, rules)

    resp = client.get("/api/identity/blocked", headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["total"] == 4
    rows = [
        (
            i["kind"],
            i["value"],
            i["reason"],
            i["blocked_by"],
            i["pattern"],
            i["higher_priority_ids"],
            i["cap"],
            i["events"],
        )
        for i in body["items"]
    ]
    # The phone's link to the blocked email does not count against the cap.
    assert rows == [
        ("email", "UNKNOWN", "blocked", "value", None, None, None, 4),
        ("phone", phone, "capped", None, None, 3, 2, 3),
        ("email", "unknown", "blocked", "value", None, None, None, 2),
        (
            "email",
            "noreply@shop.com",
            "blocked",
            "pattern",
            "(test|noreply|no-reply)@.*",
            None,
            None,
            1,
        ),
    ]
    assert body["items"][1]["first_seen"] < body["items"][1]["last_seen"]

    capped = client.get("/api/identity/blocked", params={"reason": "capped"}, headers=headers)
    assert [i["value"] for i in capped.json()["items"]] == [phone]
    page = client.get(
        "/api/identity/blocked", params={"kind": "email", "limit": 1, "offset": 1}, headers=headers
    ).json()
    assert (page["total"], page["next_offset"]) == (3, 2)
    assert [i["value"] for i in page["items"]] == ["unknown"]
    none = client.get(
        "/api/identity/blocked", params={"kind": "phone", "reason": "blocked"}, headers=headers
    ).json()
    assert (none["total"], none["items"]) == (0, [])
    bad = client.get("/api/identity/blocked", params={"reason": "other"}, headers=headers)
    assert bad.status_code == 422
    marketer = _headers(db, Role.marketer)
    assert client.get("/api/identity/blocked", headers=marketer).status_code == 403
