"""The sources API, mapping validation and the loader's guarantees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from ingestion import service
from ingestion.loader import Loader
from tests.conftest import BACKENDS, make_key
from tests.ingestion.conftest import create_source, track_load

JsonDict = dict[str, Any]  # Any: JSON


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_source_lifecycle_create_list_update_disable_delete(
    client: TestClient, data_headers: dict[str, str]
) -> None:
    created = create_source(
        client,
        data_headers,
        name="crm",
        kind="file",
        mapping={
            "type": "identify",
            "timestamp": "updated",
            "identifiers": [{"kind": "email", "column": "mail"}],
        },
    )
    assert created["write_key"] is None
    web = create_source(client, data_headers, name="web", kind="http")
    assert web["write_key"].startswith("wk_")
    listed = client.get("/api/sources", headers=data_headers).json()
    assert [s["name"] for s in listed["items"]] == ["crm", "web"]
    assert "write_key" not in listed["items"][1]
    assert web["write_key"] not in str(listed)
    resp = client.patch(
        f"/api/sources/{created['id']}", json={"name": "crm-export"}, headers=data_headers
    )
    assert resp.status_code == 200
    assert resp.json()["name"] == "crm-export"
    clash = client.patch(
        f"/api/sources/{created['id']}", json={"name": "web"}, headers=data_headers
    )
    assert clash.status_code == 409
    assert clash.json()["error"]["code"] == "ingestion.duplicate_source_name"
    disabled = client.post(f"/api/sources/{created['id']}/disable", headers=data_headers)
    assert disabled.json()["enabled"] is False
    assert client.delete(f"/api/sources/{created['id']}", headers=data_headers).status_code == 204
    assert client.get(f"/api/sources/{created['id']}", headers=data_headers).status_code == 404


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"identifiers": [{"kind": "passport", "column": "p"}]}, "unknown identifier kind"),
        ({"identifiers": [{"kind": "email"}]}, "either `column` or `composite`"),
        ({"identifiers": [{"kind": "email", "composite": ["a", "b"]}]}, "built-in kind"),
        ({"custom_kinds": ["Bad Kind"]}, "lower snake case"),
        ({"event": "x", "event_column": "y"}, "either `event` or `event_column`"),
        ({"unknown_field": 1}, "Extra inputs"),
    ],
)
def test_invalid_mappings_are_422_with_a_clear_message(
    client: TestClient, data_headers: dict[str, str], mapping: JsonDict, message: str
) -> None:
    resp = client.post(
        "/api/sources", json={"name": "s", "kind": "file", "mapping": mapping}, headers=data_headers
    )
    assert resp.status_code == 422
    assert message in resp.text


def test_custom_kinds_and_composites_are_accepted(
    client: TestClient, data_headers: dict[str, str]
) -> None:
    created = create_source(
        client,
        data_headers,
        name="s",
        kind="file",
        mapping={
            "custom_kinds": ["member_no"],
            "identifiers": [
                {"kind": "member_no", "column": "m"},
                {"kind": "name_dob_postcode", "composite": ["last_name", "birth_date", "postcode"]},
            ],
        },
    )
    assert created["mapping"]["identifiers"][1]["composite"] == [
        "last_name",
        "birth_date",
        "postcode",
    ]


def test_database_config_is_validated_and_its_password_masked(
    client: TestClient, data_headers: dict[str, str]
) -> None:
    bad = client.post(
        "/api/sources",
        json={"name": "db", "kind": "database", "config": {"url": "postgresql://x"}},
        headers=data_headers,
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "ingestion.invalid_mapping"
    good = create_source(
        client,
        data_headers,
        name="db",
        kind="database",
        config={
            "url": "postgresql://etl:s3cret@db.example/shop",
            "table": "orders",
            "cursor_column": "updated_at",
            "schedule": {"interval_seconds": 3600},
        },
    )
    assert "s3cret" not in str(good)
    rotated = client.post(f"/api/sources/{good['id']}/write-key", headers=data_headers)
    assert rotated.status_code == 409


def test_sources_need_the_data_role(client: TestClient, db: Database) -> None:
    marketer = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}
    assert client.get("/api/sources", headers=marketer).status_code == 403


def test_loader_dedupes_across_restarts_and_keeps_event_ids_monotonic(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    with Warehouse(path) as warehouse:
        first = Loader(warehouse).load(track_load("s1", ["a", "b", "c"]))
        assert (first["s1"].accepted, first["s1"].first_event_id, first["s1"].last_event_id) == (
            3,
            1,
            3,
        )
    with Warehouse(path) as warehouse:  # a restarted process: a new loader
        loader = Loader(warehouse)
        again = loader.load(track_load("s1", ["c", "d"]))
        assert (again["s1"].accepted, again["s1"].duplicates) == (1, 1)
        assert again["s1"].first_event_id == 4
        other = loader.load(track_load("s2", ["a"]))  # same message id, another source: kept
        assert other["s2"].accepted == 1
        assert service.high_water_mark(warehouse) == 5
        pairs = warehouse.rows(
            Query(
                "SELECT e.message_id, i.value FROM events e"
                " JOIN event_identifiers i USING (event_id)"
                " ORDER BY event_id"
            )
        )
        assert pairs == [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d"), ("a", "a")]
        batches = warehouse.rows(
            Query(
                "SELECT batch_id, source_id, first_event_id, last_event_id, events"
                " FROM ingest_batches ORDER BY batch_id"
            )
        )
        assert batches == [(1, "s1", 1, 3, 3), (2, "s1", 4, 4, 1), (3, "s2", 5, 5, 1)]
