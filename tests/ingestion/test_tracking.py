"""The Segment-compatible tracking API through the real app, committed to a real DuckDB."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cdp.warehouse import Query, Warehouse
from ingestion import service
from ingestion.loader import loader_for
from tests.ingestion.conftest import basic, drained

JsonDict = dict[str, Any]  # Any: JSON


def _identifiers(warehouse: Warehouse, message_id: str) -> set[tuple[str, str]]:
    rows = warehouse.rows(
        Query(
            "SELECT i.kind, i.value FROM event_identifiers i JOIN events e USING (event_id)"
            " WHERE e.message_id = $m",
            {"m": message_id},
        )
    )
    return {(r[0], r[1]) for r in rows}


def _stats(client: TestClient, source: JsonDict, headers: dict[str, str]) -> JsonDict:
    drained(client)
    resp = client.get(f"/api/sources/{source['id']}/stats", headers=headers)
    assert resp.status_code == 200, resp.text
    stats: JsonDict = resp.json()
    return stats


def test_batch_stores_events_with_normalised_identifiers(
    client: TestClient, http_source: JsonDict, warehouse: Warehouse
) -> None:
    body = {
        "batch": [
            {
                "type": "identify",
                "messageId": "m1",
                "userId": " u-1 ",
                "anonymousId": None,
                "traits": {"email": " Ann@Example.COM ", "phone": "06 12 34 56 78"},
                "context": {"device": {"id": "dev-9"}},
                "timestamp": "2026-11-20T10:00:00Z",
            },
            {
                "type": "track",
                "messageId": "m2",
                "anonymousId": "anon-1",
                "event": "Order Completed",
                "properties": {"total": 12.5, "loyalty_card": "CARD-7"},
                "traits": {"last_name": "Lefèvre", "birth_date": "1980-01-02"},
                "timestamp": "2026-11-20T10:05:00+01:00",
            },
        ]
    }
    resp = client.post("/v1/batch", json=body, headers=basic(http_source["write_key"]))
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"success": True}
    drained(client)
    assert _identifiers(warehouse, "m1") == {
        ("user_id", "u-1"),
        ("email", "ann@example.com"),
        ("phone", "+33612345678"),
        ("device_id", "dev-9"),
    }
    assert _identifiers(warehouse, "m2") == {
        ("anonymous_id", "anon-1"),
        ("loyalty_card", "CARD-7"),
        ("name_dob", "lefevre|1980-01-02"),
    }
    row = warehouse.rows(
        Query(
            "SELECT type, event, timestamp, properties->>'$.total' FROM events"
            " WHERE message_id = 'm2'"
        )
    )[0]
    assert row[:2] == ("track", "Order Completed")
    assert row[2] == datetime(2026, 11, 20, 9, 5)
    assert row[3] == "12.5"
    assert service.high_water_mark(warehouse) == 2


def test_bad_items_are_rejected_by_index_and_good_ones_stored(
    client: TestClient, http_source: JsonDict, data_headers: dict[str, str], warehouse: Warehouse
) -> None:
    good = {"type": "track", "messageId": "ok", "userId": "u", "event": "E"}
    body = {
        "batch": [
            good,
            {"type": "track", "messageId": "no-id", "event": "E"},
            {"type": "nope", "messageId": "bad-type", "userId": "u"},
            {"type": "track", "messageId": "bad-ts", "userId": "u", "event": "E", "timestamp": "x"},
            {"type": "alias", "messageId": "bad-alias", "userId": "u"},
            {"type": "track", "messageId": "no-event", "userId": "u"},
            "not an object",
        ]
    }
    resp = client.post("/v1/batch", json=body, headers=basic(http_source["write_key"]))
    assert resp.status_code == 200
    rejected = resp.json()["rejected"]
    assert [r["index"] for r in rejected] == [1, 2, 3, 4, 5, 6]
    assert "userId or anonymousId" in rejected[0]["reason"]
    assert "unknown type" in rejected[1]["reason"]
    assert "timestamp" in rejected[2]["reason"]
    assert "previousId" in rejected[3]["reason"]
    drained(client)
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 1
    stats = _stats(client, http_source, data_headers)
    assert (stats["received"], stats["accepted"], stats["rejected"]) == (7, 1, 6)
    assert stats["recent_errors"][0]["reason"]
    assert stats["last_event_at"] is not None


def test_resent_message_ids_are_dropped_and_counted(
    client: TestClient, http_source: JsonDict, data_headers: dict[str, str], warehouse: Warehouse
) -> None:
    batch = {
        "batch": [
            {"type": "track", "messageId": f"m{i}", "userId": "u", "event": "E"} for i in range(3)
        ]
    }
    batch["batch"].append(dict(batch["batch"][0]))  # the same message twice in one batch
    headers = basic(http_source["write_key"])
    assert client.post("/v1/batch", json=batch, headers=headers).status_code == 200
    assert client.post("/v1/batch", json=batch, headers=headers).status_code == 200
    drained(client)
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 3
    stats = _stats(client, http_source, data_headers)
    assert (stats["received"], stats["accepted"], stats["duplicates"]) == (8, 3, 5)
    ids = warehouse.rows(Query("SELECT event_id FROM events ORDER BY event_id"))
    assert [r[0] for r in ids] == [1, 2, 3]


def test_gzip_body_write_key_in_body_and_single_endpoints(
    client: TestClient, http_source: JsonDict, warehouse: Warehouse
) -> None:
    body = {
        "writeKey": http_source["write_key"],
        "batch": [{"type": "page", "messageId": "p1", "anonymousId": "a", "name": "Home"}],
    }
    resp = client.post(
        "/v1/batch",
        content=gzip.compress(orjson.dumps(body)),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    headers = basic(http_source["write_key"])
    singles: dict[str, JsonDict] = {
        "identify": {"userId": "u1", "traits": {"plan": "pro"}},
        "track": {"userId": "u1", "event": "Signed Up"},
        "screen": {"userId": "u1", "name": "Cart"},
        "group": {"userId": "u1", "groupId": "g1", "traits": {"email": "team@corp.com"}},
        "alias": {"userId": "u1", "previousId": "anon-0"},
    }
    for endpoint, message in singles.items():
        resp = client.post(
            f"/v1/{endpoint}", json={"messageId": endpoint, **message}, headers=headers
        )
        assert resp.status_code == 200, (endpoint, resp.text)
    drained(client)
    types = dict(warehouse.rows(Query("SELECT message_id, type FROM events")))
    assert types == {
        "p1": "page",
        "identify": "identify",
        "track": "track",
        "screen": "screen",
        "group": "group",
        "alias": "alias",
    }
    assert warehouse.scalar(Query("SELECT event FROM events WHERE message_id = 'p1'")) == "Home"
    # group traits describe the group, not the person: no email identifier for the user.
    assert _identifiers(warehouse, "group") == {("user_id", "u1")}
    assert _identifiers(warehouse, "alias") == {("user_id", "u1"), ("anonymous_id", "anon-0")}
    assert (
        warehouse.scalar(
            Query(
                "SELECT group_id FROM event_segment_fields f JOIN events e USING (event_id)"
                " WHERE e.message_id = 'group'"
            )
        )
        == "g1"
    )


def test_invalid_single_message_is_a_400_json_error(
    client: TestClient, http_source: JsonDict
) -> None:
    resp = client.post("/v1/track", json={"userId": "u"}, headers=basic(http_source["write_key"]))
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "ingestion.malformed"
    assert "event" in resp.json()["error"]["message"]
    bad_json = client.post(
        "/v1/batch", content=b"{not json", headers=basic(http_source["write_key"])
    )
    assert bad_json.status_code == 400


def test_wrong_or_disabled_write_key_is_401(
    client: TestClient, http_source: JsonDict, data_headers: dict[str, str]
) -> None:
    body = {"batch": [{"type": "track", "userId": "u", "event": "E"}]}
    assert client.post("/v1/batch", json=body, headers=basic("wk_nope")).status_code == 401
    assert client.post("/v1/batch", json=body).status_code == 401
    resp = client.post(f"/api/sources/{http_source['id']}/disable", headers=data_headers)
    assert resp.status_code == 200
    denied = client.post("/v1/batch", json=body, headers=basic(http_source["write_key"]))
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "ingestion.invalid_write_key"


def test_rotated_write_key_replaces_the_old_one(
    client: TestClient, http_source: JsonDict, data_headers: dict[str, str]
) -> None:
    resp = client.post(f"/api/sources/{http_source['id']}/write-key", headers=data_headers)
    new_key = resp.json()["write_key"]
    assert new_key
    assert new_key != http_source["write_key"]
    body = {"batch": [{"type": "track", "userId": "u", "event": "E"}]}
    assert (
        client.post("/v1/batch", json=body, headers=basic(http_source["write_key"])).status_code
        == 401
    )
    assert client.post("/v1/batch", json=body, headers=basic(new_key)).status_code == 200


def test_size_limits(client: TestClient, http_source: JsonDict) -> None:
    headers = basic(http_source["write_key"])
    huge = {
        "batch": [
            {"type": "track", "userId": "u", "event": "E", "properties": {"x": "y" * 600_000}}
        ]
    }
    resp = client.post("/v1/batch", json=huge, headers=headers)
    assert resp.status_code == 413
    too_many = {"batch": [{"type": "track", "userId": "u", "event": "E"}] * 2501}
    assert client.post("/v1/batch", json=too_many, headers=headers).status_code == 400
    big_message = {
        "batch": [
            {"type": "track", "userId": "u", "event": "E", "properties": {"x": "y" * 40_000}},
            {"type": "track", "userId": "u", "event": "E"},
        ]
    }
    resp = client.post("/v1/batch", json=big_message, headers=headers)
    assert resp.status_code == 200
    assert [r["index"] for r in resp.json()["rejected"]] == [0]
    bomb = gzip.compress(b'{"batch": [' + b" " * 2_000_000 + b"]}")
    resp = client.post("/v1/batch", content=bomb, headers={**headers, "Content-Encoding": "gzip"})
    assert resp.status_code == 413


def test_clock_skew_is_corrected_from_sent_at(
    client: TestClient, http_source: JsonDict, warehouse: Warehouse
) -> None:
    # The client clock is 1 hour ahead: it stamps events and sentAt an hour in the future.
    now = datetime.now(UTC)
    ahead = now + timedelta(hours=1)
    body = {
        "sentAt": ahead.isoformat(),
        "context": {"library": {"name": "test"}, "traits": {"email": "skew@x.io"}},
        "batch": [
            {
                "type": "identify",
                "messageId": "s1",
                "userId": "u",
                "timestamp": (ahead - timedelta(minutes=5)).isoformat(),
                "traits": None,
            }
        ],
    }
    resp = client.post("/v1/batch", json=body, headers=basic(http_source["write_key"]))
    assert resp.status_code == 200
    drained(client)
    ts, received, traits, context = warehouse.rows(
        Query("SELECT timestamp, received_at, traits, context FROM events")
    )[0]
    assert received - ts == timedelta(minutes=5)
    assert abs(received - now.replace(tzinfo=None)) < timedelta(minutes=1)
    # identify traits sent only in context.traits become the event's traits
    assert orjson.loads(traits) == {"email": "skew@x.io"}
    assert orjson.loads(context)["library"] == {"name": "test"}
    assert ("email", "skew@x.io") in _identifiers(warehouse, "s1")


def test_placeholder_identifiers_are_dropped_and_counted(
    client: TestClient, http_source: JsonDict, data_headers: dict[str, str], warehouse: Warehouse
) -> None:
    body = {
        "batch": [
            {
                "type": "identify",
                "messageId": "p",
                "userId": "u",
                "traits": {"email": "test@test.com", "phone": "0000000000"},
            }
        ]
    }
    assert (
        client.post("/v1/batch", json=body, headers=basic(http_source["write_key"])).status_code
        == 200
    )
    drained(client)
    assert _identifiers(warehouse, "p") == {("user_id", "u")}
    assert _stats(client, http_source, data_headers)["identifiers_dropped"] == 2


def test_full_backlog_answers_429_with_retry_after(
    app: FastAPI, client: TestClient, http_source: JsonDict, warehouse: Warehouse
) -> None:
    runtime = app.state.ingestion
    runtime.writer.max_backlog = 3
    headers = basic(http_source["write_key"])
    body = {"batch": [{"type": "track", "userId": "u", "event": "E"}] * 3}
    lock = loader_for(warehouse)._lock
    lock.acquire()  # the drainer cannot load: spooled events pile up
    try:
        assert client.post("/v1/batch", json=body, headers=headers).status_code == 200
        assert runtime.writer.backlog == 3
        resp = client.post("/v1/batch", json=body, headers=headers)
        assert resp.status_code == 429
        assert resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["code"] == "ingestion.queue_full"
    finally:
        lock.release()
    drained(client)
    assert runtime.writer.backlog == 0
    assert client.post("/v1/batch", json=body, headers=headers).status_code == 200
    drained(client)
    # The refused batch was not stored; both accepted ones were.
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 6


@pytest.mark.parametrize("endpoint", ["track", "batch"])
def test_unauthenticated_tracking_requests_get_json_errors(
    client: TestClient, endpoint: str
) -> None:
    resp = client.post(f"/v1/{endpoint}", json={})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "ingestion.invalid_write_key"


def test_a_bad_batch_sent_at_rejects_the_messages_that_rely_on_it(
    client: TestClient, http_source: JsonDict, warehouse: Warehouse
) -> None:
    body = {
        "sentAt": "yesterday",
        "batch": [
            {"type": "track", "messageId": "a", "userId": "u", "event": "E"},
            {
                "type": "track",
                "messageId": "b",
                "userId": "u",
                "event": "E",
                "sentAt": "2026-11-20T10:00:00Z",
            },
        ],
    }
    resp = client.post("/v1/batch", json=body, headers=basic(http_source["write_key"]))
    assert resp.status_code == 200
    [rejected] = resp.json()["rejected"]
    assert (rejected["index"], rejected["messageId"]) == (0, "a")
    assert "timestamp" in rejected["reason"]
    drained(client)
    assert warehouse.rows(Query("SELECT message_id FROM events")) == [("b",)]
