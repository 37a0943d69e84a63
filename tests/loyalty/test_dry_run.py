"""The dry run explains which rules fire for a sample event and member, and why."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from cdp.db import Database
from tests.loyalty.conftest import T0, earn, make_member, make_program


def test_dry_run_explains_each_rule_verdict_and_writes_nothing(
    db: Database, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    member = make_member(db, program, "a")
    earn(db, program, member, 10, key="seed")
    base = f"/api/loyalty/programs/{program.id}"
    rules = [
        {"name": "base", "event_name": "Order Completed", "formula": {"type": "per_amount"}},
        {
            "name": "big baskets",
            "event_name": "Order Completed",
            "formula": {"type": "fixed", "points": 50},
            "condition": {"field": "properties.total", "op": "gte", "value": 100},
        },
        {
            "name": "reviews",
            "event_name": "Review Submitted",
            "formula": {"type": "fixed", "points": 5},
        },
        {
            "name": "summer",
            "event_name": "Order Completed",
            "formula": {"type": "fixed", "points": 9},
            "starts_at": (T0 + timedelta(days=90)).isoformat(),
        },
    ]
    for rule in rules:
        resp = client.post(f"{base}/rules", json=rule, headers=loyalty_headers)
        assert resp.status_code == 201, resp.text
    body = {
        "event": {
            "event": "Order Completed",
            "properties": {"total": 42.5},
            "timestamp": T0.isoformat(),
        },
        "member": {"member_id": member.id},
    }
    resp = client.post(f"{base}/dry-run", json=body, headers=loyalty_headers)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    verdicts = {v["name"]: v for v in result["rules"]}
    assert result["total_points"] == 42
    assert verdicts["base"]["fired"] is True
    assert verdicts["base"]["reason"] == "fired: 42 points"
    assert verdicts["big baskets"]["reason"] == "condition is false"
    assert verdicts["big baskets"]["condition"] == {
        "field": "properties.total",
        "op": "gte",
        "value": 100,
        "actual": "42.5",
        "result": False,
    }
    assert verdicts["reviews"]["trigger_matched"] is False
    assert verdicts["summer"]["reason"] == "outside the rule's campaign window"
    balance = client.get(f"/api/loyalty/members/{member.id}/balance", headers=loyalty_headers)
    assert balance.json()["total"] == 10


def test_dry_run_tries_draft_rules_on_a_described_member(
    db: Database, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    body = {
        "event": {"event": "Signed Up"},
        "member": {"traits": {"country": "FR"}},
        "rules": [
            {
                "name": "welcome FR",
                "event_name": "Signed Up",
                "formula": {"type": "fixed", "points": 200},
                "condition": {"field": "traits.country", "value": "FR"},
                "exclusive": True,
                "priority": 1,
            },
            {
                "name": "welcome",
                "event_name": "Signed Up",
                "formula": {"type": "fixed", "points": 100},
            },
        ],
    }
    resp = client.post(
        f"/api/loyalty/programs/{program.id}/dry-run", json=body, headers=loyalty_headers
    )
    assert resp.status_code == 200, resp.text
    verdicts = [(v["name"], v["points"], v["blocked_by"]) for v in resp.json()["rules"]]
    assert verdicts == [("welcome FR", 200, None), ("welcome", 0, "draft-0")]


def test_invalid_condition_is_rejected_with_the_reason(
    db: Database, client: TestClient, loyalty_headers: dict[str, str]
) -> None:
    program = make_program(db)
    resp = client.post(
        f"/api/loyalty/programs/{program.id}/rules",
        json={
            "name": "x",
            "event_name": "Order Completed",
            "formula": {"type": "fixed", "points": 1},
            "condition": {"field": "member.password", "value": 1},
        },
        headers=loyalty_headers,
    )
    assert resp.status_code == 422
    assert "member fields are" in resp.text
