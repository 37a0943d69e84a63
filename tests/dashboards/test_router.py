"""The KPI and custom dashboard APIs over HTTP: catalogue, series, CSV, CRUD, roles, jobs."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from tests.conftest import BACKENDS, make_key
from tests.dashboards.conftest import DAY

RANGE = {"from": DAY.isoformat(), "to": (DAY + timedelta(days=2)).isoformat()}


def _widget(**overrides: Any) -> dict[str, Any]:  # Any: JSON
    return {"metric": "events_received", "chart": "line", **overrides}


def test_catalogue_lists_metrics_with_breakdowns_and_what_is_still_to_come(
    client: TestClient, viewer_headers: dict[str, str]
) -> None:
    body = client.get("/api/dashboards/metrics", headers=viewer_headers).json()
    metrics = {m["name"]: m for m in body["metrics"]}
    assert set(metrics) == {
        "events_received",
        "events_occurred",
        "ingest_batches",
        "identifiers_seen",
        "job_runs",
        "job_failures",
        "events_rejected",
        "duplicates_dropped",
        "merge_rate",
        "identifiers_per_profile",
        "segment_size",
        "segment_entries",
        "segment_exits",
        "points_issued",
        "points_redeemed",
        "points_expired",
        "enrolments",
        "active_members",
        "redemption_rate",
        "members",
        "points_liability",
        "tier_distribution",
        "tier_movements",
        "top_rewards",
        "member_vs_non_member",
        "segment_overlap",
        "blocked_values_hit",
    }
    assert metrics["events_received"]["breakdowns"] == ["source", "event_type"]
    assert metrics["job_runs"]["store"] == "operational"
    assert metrics["events_received"]["grains"] == ["day", "week", "month"]
    assert metrics["tier_movements"]["split"] == "direction"
    assert metrics["segment_overlap"]["needs_segments"] is True
    assert metrics["points_issued"]["needs_segments"] is False
    assert body["planned"] == []  # every metric the issue names is registered


def test_kpi_series_as_json_and_csv_agree(
    client: TestClient, seeded: Warehouse, viewer_headers: dict[str, str]
) -> None:
    params = {**RANGE, "breakdown": "source"}
    body = client.get("/api/kpis/events_received", params=params, headers=viewer_headers)
    assert body.status_code == 200, body.text
    data = body.json()
    assert (data["from"], data["to"], data["grain"]) == (RANGE["from"], RANGE["to"], "day")
    assert data["keys"] == ["web", "pos", "app"]
    assert data["total"] == 5
    assert len(data["points"]) == 3 * 3
    as_csv = client.get(
        "/api/kpis/events_received", params={**params, "format": "csv"}, headers=viewer_headers
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert list(rows[0]) == ["period", "source", "value"]
    assert [(r["period"], r["source"], int(r["value"])) for r in rows] == [
        (p["period"], p["key"], p["value"]) for p in data["points"]
    ]


def test_unknown_metric_or_breakdown_is_422(
    client: TestClient, seeded: Warehouse, viewer_headers: dict[str, str]
) -> None:
    unknown = client.get("/api/kpis/nope", headers=viewer_headers)
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "dashboards.unknown_metric"
    not_listed = client.get(
        "/api/kpis/events_received",
        params={"breakdown": "x; DROP TABLE events"},
        headers=viewer_headers,
    )
    assert not_listed.status_code == 422
    assert not_listed.json()["error"]["code"] == "validation_error"
    not_offered = client.get(
        "/api/kpis/events_received", params={"breakdown": "tier"}, headers=viewer_headers
    )
    assert not_offered.status_code == 422
    assert not_offered.json()["error"]["code"] == "dashboards.unsupported_breakdown"
    reversed_range = client.get(
        "/api/kpis/events_received",
        params={"from": RANGE["to"], "to": RANGE["from"]},
        headers=viewer_headers,
    )
    assert reversed_range.json()["error"]["code"] == "dashboards.invalid_range"
    no_programme = client.get(
        "/api/kpis/points_issued", params={"program_id": "no-such"}, headers=viewer_headers
    )
    assert no_programme.status_code == 422, no_programme.text
    assert no_programme.json()["error"] == {
        "code": "dashboards.unknown_program",
        "message": "loyalty programme 'no-such' does not exist",
        "details": {"program_id": "no-such"},
    }
    assert seeded.scalar(Query("SELECT count(*) FROM events")) == 6


def test_default_range_is_the_last_30_days(
    client: TestClient, viewer_headers: dict[str, str]
) -> None:
    data = client.get("/api/kpis/job_runs", headers=viewer_headers).json()
    assert len(data["points"]) == 30
    assert data["total"] == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_custom_dashboard_crud_with_pagination(
    client: TestClient, db: Database, viewer_headers: dict[str, str]
) -> None:
    editor = {"Authorization": f"Bearer {make_key(db, Role.marketer)}"}
    body = {
        "title": "Ops",
        "widgets": [
            _widget(breakdown="source", grain="week", chart="bar"),
            _widget(
                metric="job_failures",
                chart="number",
                range={"from": "2026-01-01", "to": "2026-01-31"},
            ),
        ],
    }
    created = client.post("/api/dashboards", json=body, headers=editor)
    assert created.status_code == 201, created.text
    first = created.json()
    assert first["widgets"][1]["range"] == {"from": "2026-01-01", "to": "2026-01-31"}
    assert first["widgets"][0]["range"] == "30d"
    second = client.post("/api/dashboards", json={**body, "title": "Two"}, headers=editor).json()
    page = client.get("/api/dashboards", params={"limit": 1}, headers=viewer_headers).json()
    assert (page["total"], page["next_offset"], page["items"][0]["id"]) == (2, 1, second["id"])
    got = client.get(f"/api/dashboards/{first['id']}", headers=viewer_headers).json()
    assert got["title"] == "Ops"
    replaced = client.put(
        f"/api/dashboards/{first['id']}",
        json={"title": "Ops v2", "widgets": [_widget(chart="table")]},
        headers=editor,
    )
    assert replaced.status_code == 200, replaced.text
    assert [w["chart"] for w in replaced.json()["widgets"]] == ["table"]
    assert client.delete(f"/api/dashboards/{first['id']}", headers=editor).status_code == 204
    gone = client.get(f"/api/dashboards/{first['id']}", headers=viewer_headers)
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "dashboards.not_found"


def test_dashboard_widgets_are_checked_against_the_catalogue(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    def post(*widgets: dict[str, Any]) -> Any:  # Any: JSON
        return client.post(
            "/api/dashboards", json={"title": "x", "widgets": list(widgets)}, headers=admin_headers
        )

    unknown = post(_widget(), _widget(metric="no_such_metric"))
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "dashboards.unknown_metric"
    assert unknown.json()["error"]["details"]["widget"] == 1
    unsupported = post(_widget(breakdown="job"))
    assert unsupported.json()["error"]["code"] == "dashboards.unsupported_breakdown"
    assert post(_widget(chart="pie")).status_code == 422
    assert post(_widget(range={"from": "2026-02-01", "to": "2026-01-01"})).status_code == 422
    assert post().status_code == 422
    listed = client.get("/api/dashboards", headers=admin_headers).json()
    assert listed["total"] == 0


def test_viewers_read_dashboards_but_cannot_save_them(
    client: TestClient, viewer_headers: dict[str, str]
) -> None:
    body = {"title": "x", "widgets": [_widget()]}
    assert client.post("/api/dashboards", json=body, headers=viewer_headers).status_code == 403
    assert client.get("/api/dashboards", headers=viewer_headers).status_code == 200


def test_snapshot_job_keeps_history_after_raw_events_are_erased(
    client: TestClient, seeded: Warehouse, admin_headers: dict[str, str]
) -> None:
    before = client.get("/api/kpis/events_received", params=RANGE, headers=admin_headers).json()
    run = client.post(
        "/api/jobs/dashboards.kpi_snapshots/run", params={"wait": "true"}, headers=admin_headers
    )
    assert run.status_code == 202, run.text
    assert run.json()["status"] == "succeeded"
    assert run.json()["rows"] > 0
    seeded.execute(Query("DELETE FROM events"))
    seeded.execute(Query("DELETE FROM event_identifiers"))
    after = client.get("/api/kpis/events_received", params=RANGE, headers=admin_headers).json()
    assert after["points"] == before["points"]
    assert after["total"] == 5
    assert len(after["snapshot_days"]) == 3
    runs = client.get("/api/kpis/job_runs", params={"breakdown": "job"}, headers=admin_headers)
    assert runs.json()["keys"] == ["dashboards.kpi_snapshots"]
