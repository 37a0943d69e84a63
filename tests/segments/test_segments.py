"""Saved segments over HTTP: catalogue, preview, versions, refresh history, members, exports."""

from __future__ import annotations

import io
from datetime import timedelta

import polars as pl
import pytest
from fastapi.testclient import TestClient

from cdp.app import registered_jobs
from cdp.auth import Role
from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Warehouse
from identity import service as identity_service
from segments import service
from tests.conftest import BACKENDS, make_key
from tests.segments.conftest import NOW, Ev, profile_of, resolve, write_events

FRENCH = {"field": "traits.country", "op": "eq", "value": "FR"}


@pytest.fixture
def h(db: Database) -> dict[str, str]:
    """Headers of a marketer key."""
    return {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}


def test_catalog_lists_traits_attributes_and_event_properties_with_types(
    client: TestClient, seeded: Warehouse, h: dict[str, str]
) -> None:
    assert client.post("/api/attributes/refresh", headers=h).status_code == 200
    body = client.get("/api/segments/catalog", headers=h).json()
    fields = {f["name"]: f for f in body["fields"]}
    assert fields["traits.country"]["type"] == "string"
    assert fields["traits.age"]["type"] == "number"
    assert fields["traits.birthday"]["type"] == "timestamp"
    assert fields["traits.vip"]["type"] == "boolean"
    assert "birthday_in_next_days" in fields["traits.birthday"]["ops"]
    assert fields["attributes.spend_total"]["type"] == "number"
    assert fields["attributes.orders_count"]["type"] == "integer"
    assert fields["attributes.last_purchase_at"]["kind"] == "attribute"
    assert fields["profile.first_seen"]["type"] == "timestamp"
    events = {e["event"]: {p["name"]: p["type"] for p in e["properties"]} for e in body["events"]}
    assert events["Order Completed"] == {
        "category": "string",
        "order_id": "string",
        "revenue": "number",
        "total": "number",
    }
    assert events["Product Viewed"] == {"category": "string"}
    schema = client.get("/api/segments/rule-schema", headers=h).json()
    assert "Compare" in str(schema)


def test_preview_counts_and_samples_without_saving(
    client: TestClient, seeded: Warehouse, h: dict[str, str]
) -> None:
    resp = client.post(
        "/api/segments/preview",
        json={"rule": {"all": [FRENCH, {"event": "Order Completed"}]}, "sample_size": 5},
        headers=h,
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["count"] == 1
    assert body["sample"] == [
        {
            "profile_id": profile_of(seeded, "alice"),
            "traits": {"country": "FR", "age": 34, "birthday": "1990-06-20", "vip": True},
        }
    ]
    both = client.post("/api/segments/preview", json={"rule": FRENCH}, headers=h).json()
    assert both["count"] == 2
    assert client.get("/api/segments", headers=h).json()["total"] == 0
    bad = client.post(
        "/api/segments/preview",
        json={
            "rule": {"all": [FRENCH, {"any": [{"field": "traits.age", "op": "gt", "value": "x"}]}]}
        },
        headers=h,
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "segments.invalid_rule"
    assert bad.json()["error"]["message"].startswith("rule.all[1].any[0].value:")
    malformed = client.post(
        "/api/segments/preview", json={"rule": {"all": [{"field": "x", "op": "nope"}]}}, headers=h
    )
    assert malformed.status_code == 422
    assert malformed.json()["error"]["details"][0]["path"] == "rule.all[0].op"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_segment_lifecycle_versions_history_members_and_exports(
    client: TestClient, seeded: Warehouse, h: dict[str, str]
) -> None:
    created = client.post(
        "/api/segments",
        json={"name": "French", "rule": FRENCH, "refresh_minutes": 30},
        headers=h,
    )
    assert created.status_code == 201, created.text
    seg = created.json()
    sid = seg["id"]
    assert seg["version"] == 1
    assert seg["last_size"] is None
    assert (
        client.post("/api/segments", json={"name": "French", "rule": FRENCH}, headers=h).status_code
        == 409
    )

    first = client.post(f"/api/segments/{sid}/refresh", headers=h).json()
    assert (first["size"], first["entries"], first["exits"]) == (2, 2, 0)
    members = client.get(f"/api/segments/{sid}/members?limit=1", headers=h).json()
    assert members["total"] == 2
    assert members["next_offset"] == 1
    assert len(members["items"]) == 1
    page2 = client.get(f"/api/segments/{sid}/members?limit=1&offset=1", headers=h).json()
    ids = {members["items"][0]["profile_id"], page2["items"][0]["profile_id"]}
    assert ids == {profile_of(seeded, "alice"), profile_of(seeded, "carol")}

    # Dave moves to France: he enters at the next refresh.
    write_events(seeded, [Ev("dave", type="identify", at=NOW, traits={"country": "FR"})])
    resolve(seeded)
    second = client.post(f"/api/segments/{sid}/refresh", headers=h).json()
    assert (second["size"], second["entries"], second["exits"]) == (3, 1, 0)

    # A new rule is a new version; under it carol leaves.
    updated = client.put(
        f"/api/segments/{sid}",
        json={"rule": {"all": [FRENCH, {"field": "traits.age", "op": "gte", "value": 30}]}},
        headers=h,
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["version"] == 2
    same = client.put(f"/api/segments/{sid}", json={"description": "people in France"}, headers=h)
    assert same.json()["version"] == 2
    third = client.post(f"/api/segments/{sid}/refresh", headers=h).json()
    assert third["segment_version"] == 2
    assert (third["size"], third["entries"], third["exits"]) == (1, 0, 2)
    versions = client.get(f"/api/segments/{sid}/versions", headers=h).json()
    assert [v["version"] for v in versions] == [2, 1]
    assert versions[1]["rule"] == FRENCH

    sizes = client.get(f"/api/segments/{sid}/sizes", headers=h).json()
    assert [(s["size"], s["entries"], s["exits"], s["mode"]) for s in sizes["items"]] == [
        (1, 0, 2, "full"),  # a new version
        (3, 1, 0, "incremental"),  # only dave's rewritten profile was evaluated
        (2, 2, 0, "full"),
    ]
    assert sizes["items"][1]["evaluated"] == 1
    forced = client.post(f"/api/segments/{sid}/refresh?full=true", headers=h).json()
    assert (forced["size"], forced["entries"], forced["mode"]) == (1, 0, "full")
    events = client.get(f"/api/segments/events?segment_id={sid}", headers=h).json()
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert [e["kind"] for e in events] == ["entry", "entry", "entry", "exit", "exit"]
    exits = {e["profile_id"] for e in events if e["kind"] == "exit"}
    assert exits == {profile_of(seeded, "carol"), profile_of(seeded, "dave")}
    later = client.get(f"/api/segments/events?after_seq={events[2]['seq']}", headers=h).json()
    assert [e["kind"] for e in later] == ["exit", "exit"]

    csv = client.get(f"/api/segments/{sid}/export?format=csv", headers=h)
    assert csv.status_code == 200
    assert csv.headers["content-type"].startswith("text/csv")
    frame = pl.read_csv(io.BytesIO(csv.content))
    assert frame["profile_id"].to_list() == [profile_of(seeded, "alice")]
    assert "spend_total" not in frame.columns  # attributes never refreshed: no columns yet
    assert client.post("/api/attributes/refresh", headers=h).status_code == 200
    parquet = client.get(f"/api/segments/{sid}/export?format=parquet", headers=h)
    table = pl.read_parquet(io.BytesIO(parquet.content))
    assert table["profile_id"].to_list() == [profile_of(seeded, "alice")]
    assert table["spend_total"].to_list() == [150.0]
    assert '"country":"FR"' in table["traits"][0]

    # A segment another one refers to cannot go; nor can an attribute a segment compares.
    other = client.post(
        "/api/segments",
        json={
            "name": "French buyers",
            "rule": {
                "all": [
                    {"segment": sid},
                    {"field": "attributes.orders_count", "op": "gte", "value": 1},
                ]
            },
        },
        headers=h,
    )
    assert other.status_code == 201, other.text
    assert client.delete(f"/api/segments/{sid}", headers=h).status_code == 409
    cycle = client.put(
        f"/api/segments/{sid}", json={"rule": {"segment": other.json()["id"]}}, headers=h
    )
    assert cycle.status_code == 422
    assert "refer to each other" in cycle.json()["error"]["message"]
    with_attr = client.post(
        "/api/attributes", json={"name": "views", "definition": {"aggregation": "count"}}, headers=h
    )
    assert with_attr.status_code == 201
    assert client.delete("/api/attributes/views", headers=h).status_code == 204
    assert client.delete(f"/api/segments/{other.json()['id']}", headers=h).status_code == 204
    assert client.delete(f"/api/segments/{sid}", headers=h).status_code == 204
    assert client.get(f"/api/segments/{sid}/members", headers=h).status_code == 404
    assert service.segment_events_since(seeded, after_seq=0).height == 5  # history stays


def test_deleting_an_attribute_used_by_a_segment_is_refused(
    client: TestClient, seeded: Warehouse, h: dict[str, str]
) -> None:
    client.post(
        "/api/attributes",
        json={
            "name": "views",
            "definition": {"aggregation": "count", "events": ["Product Viewed"]},
        },
        headers=h,
    )
    client.post("/api/attributes/refresh", headers=h)
    seg = client.post(
        "/api/segments",
        json={"name": "Viewers", "rule": {"field": "attributes.views", "op": "gte", "value": 2}},
        headers=h,
    )
    assert seg.status_code == 201, seg.text
    refused = client.delete("/api/attributes/views", headers=h)
    assert refused.status_code == 409
    assert refused.json()["error"]["details"] == {"segments": ["Viewers"]}
    refreshed = client.post(f"/api/segments/{seg.json()['id']}/refresh", headers=h).json()
    assert refreshed["size"] == 1


def test_scheduled_refresh_runs_each_segment_on_its_own_period(
    db: Database, seeded: Warehouse
) -> None:
    settings = SegmentsSettings(default_refresh_minutes=120)
    with db.begin() as session:
        hourly = service.create_segment(
            session,
            seeded,
            name="hourly",
            description=None,
            rule=FRENCH,
            refresh_minutes=60,
            settings=settings,
            actor=None,
        )
        default = service.create_segment(
            session,
            seeded,
            name="default",
            description=None,
            rule={"field": "traits.country", "op": "eq", "value": "DE"},
            refresh_minutes=None,
            settings=settings,
            actor=None,
        )
    t0 = NOW
    done = service.refresh_due_segments(db, seeded, settings=settings, now=t0)
    assert {r.segment_id for r in done} == {hourly.id, default.id}
    assert (
        service.refresh_due_segments(db, seeded, settings=settings, now=t0 + timedelta(minutes=59))
        == []
    )
    later = service.refresh_due_segments(
        db, seeded, settings=settings, now=t0 + timedelta(minutes=61)
    )
    assert [r.segment_id for r in later] == [hourly.id]
    last = service.refresh_due_segments(
        db, seeded, settings=settings, now=t0 + timedelta(minutes=121)
    )
    assert {r.segment_id for r in last} == {hourly.id, default.id}
    names = {spec.name: spec for spec in registered_jobs()}
    assert names["segments.refresh"].trigger == "interval"
    assert names["segments.attributes"].trigger == "interval"


def test_a_profile_merged_away_exits_and_its_survivor_stays(
    db: Database, seeded: Warehouse
) -> None:
    settings = SegmentsSettings()
    write_events(seeded, [Ev("anon-1", "Product Viewed", kind="anonymous_id", email="d@x.io")])
    resolve(seeded)
    anonymous = identity_service.lookup(seeded, kind="anonymous_id", value="anon-1")
    with db.begin() as session:
        seg = service.create_segment(
            session,
            seeded,
            name="everyone with events",
            description=None,
            rule={"field": "profile.event_count", "op": "gte", "value": 1},
            refresh_minutes=None,
            settings=settings,
            actor=None,
        )
        assert (
            service.refresh_segment(session, seeded, segment_id=seg.id, settings=settings).size == 5
        )
    # Dave signs in with that email: identity merges the anonymous profile into his.
    write_events(seeded, [Ev("dave", "Product Viewed", email="d@x.io")])
    resolve(seeded)
    assert identity_service.lookup(seeded, kind="anonymous_id", value="anon-1") == profile_of(
        seeded, "dave"
    )
    with db.begin() as session:
        result = service.refresh_segment(session, seeded, segment_id=seg.id, settings=settings)
    assert (result.size, result.entries, result.exits) == (4, 0, 1)
    last = service.segment_events_since(seeded, after_seq=0).row(-1, named=True)
    assert (last["profile_id"], last["kind"]) == (anonymous, "exit")


def test_event_conditions_use_the_materialised_map_only_while_profiles_are_unchanged(
    db: Database, seeded: Warehouse
) -> None:
    settings = SegmentsSettings()
    viewed = {"event": "Product Viewed"}
    with db.begin() as session:
        stale = service.compile_segment_rule(
            session, seeded, rule=service.parse_rule(viewed), settings=settings
        )
        assert "FROM segment_event_profiles" not in stale.sql
        assert service.refresh_event_map(seeded) == 9  # the events with a name
        current = service.compile_segment_rule(
            session, seeded, rule=service.parse_rule(viewed), settings=settings
        )
        assert "FROM segment_event_profiles" in current.sql
        before = service.preview(session, seeded, rule=viewed, settings=settings)
    assert [s["profile_id"] for s in before.sample] == [profile_of(seeded, "carol")]
    write_events(seeded, [Ev("dave", "Product Viewed")])
    resolve(seeded)
    with db.begin() as session:
        stale = service.compile_segment_rule(
            session, seeded, rule=service.parse_rule(viewed), settings=settings
        )
        after = service.preview(session, seeded, rule=viewed, settings=settings)
    assert "FROM segment_event_profiles" not in stale.sql
    assert after.count == 2
    assert profile_of(seeded, "dave") in {s["profile_id"] for s in after.sample}


def test_refreshes_and_published_events_carry_utc_timestamps(
    client: TestClient, seeded: Warehouse, h: dict[str, str]
) -> None:
    created = client.post("/api/segments", json={"name": "French", "rule": FRENCH}, headers=h)
    sid = created.json()["id"]
    refresh = client.post(f"/api/segments/{sid}/refresh", headers=h).json()
    sizes = client.get(f"/api/segments/{sid}/sizes", headers=h).json()["items"]
    events = client.get(f"/api/segments/events?segment_id={sid}", headers=h).json()
    stamps = [refresh["refreshed_at"], sizes[0]["refreshed_at"], events[0]["occurred_at"]]
    assert all(s.endswith("Z") for s in stamps), stamps
