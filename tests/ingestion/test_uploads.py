"""Uploads through the real ASGI app: answered 202 at once, imported by a background job
whose record the client polls."""

from __future__ import annotations

import io
import time
from typing import Any

import polars as pl
from fastapi.testclient import TestClient

from cdp.app import create_app
from cdp.config import Settings
from cdp.db import Database, utcnow
from ingestion import service
from ingestion.models import ImportRun
from tests.ingestion.conftest import create_source
from tests.ingestion.test_files import CRM_MAPPING, CSV, _crm

JsonDict = dict[str, Any]  # Any: JSON
DONE = ("succeeded", "failed", "skipped")


def _upload(
    client: TestClient, headers: dict[str, str], source_id: str, name: str, content: bytes
) -> JsonDict:
    resp = client.post(
        f"/api/sources/{source_id}/uploads",
        files={"file": (name, content, "application/octet-stream")},
        headers=headers,
    )
    assert resp.status_code == 202, resp.text
    record: JsonDict = resp.json()
    assert resp.headers["Location"] == f"/api/sources/{source_id}/imports/{record['id']}"
    return record


def _poll(client: TestClient, headers: dict[str, str], record: JsonDict) -> JsonDict:
    """What a client does: read the import record until it is finished."""
    url = f"/api/sources/{record['source_id']}/imports/{record['id']}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = client.get(url, headers=headers)
        assert resp.status_code == 200, resp.text
        found: JsonDict = resp.json()
        if found["status"] in DONE:
            return found
        time.sleep(0.02)
    raise AssertionError(f"import {record['id']} did not finish")


def test_upload_answers_202_and_the_import_runs_as_a_job(
    client: TestClient, data_headers: dict[str, str]
) -> None:
    source = create_source(client, data_headers, name="crm", kind="file", mapping=CRM_MAPPING)
    queued = _upload(client, data_headers, source["id"], "crm.csv", CSV.encode())
    assert queued["status"] == "queued"
    assert (queued["rows_read"], queued["accepted"], queued["progress"]) == (0, 0, None)
    report = _poll(client, data_headers, queued)
    assert report["status"] == "succeeded", report
    assert (report["rows_read"], report["rows_total"], report["progress"]) == (5, 5, 1.0)
    assert (report["accepted"], report["rejected"]) == (3, 2)
    assert [e["row"] for e in report["errors"]] == [3, 4]
    assert report["duration_ms"] is not None
    assert report["name"] == "crm.csv"
    listed = client.get(f"/api/sources/{source['id']}/imports", headers=data_headers).json()
    assert listed["items"][0]["id"] == report["id"]
    # The same content again: the job finds it imported already.
    again = _poll(
        client, data_headers, _upload(client, data_headers, source["id"], "crm.csv", CSV.encode())
    )
    assert (again["status"], again["skipped"], again["accepted"]) == ("skipped", True, 0)
    stats = client.get(f"/api/sources/{source['id']}/stats", headers=data_headers).json()
    assert (stats["accepted"], stats["rejected"], stats["received"]) == (3, 2, 5)


def test_uploads_of_parquet_and_ndjson_report_their_totals(
    client: TestClient, data_headers: dict[str, str]
) -> None:
    crm = create_source(client, data_headers, name="crm", kind="file", mapping=CRM_MAPPING)
    frame = pl.read_csv(io.StringIO(CSV), infer_schema=False)
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    parquet = _poll(
        client,
        data_headers,
        _upload(client, data_headers, crm["id"], "crm.parquet", buffer.getvalue()),
    )
    assert (parquet["status"], parquet["rows_total"], parquet["accepted"]) == ("succeeded", 5, 3)
    web = create_source(client, data_headers, name="web", kind="http")
    lines = b'{"type":"track","messageId":"m1","userId":"u","event":"E","timestamp":"2026-11-01"}\n'
    lines += b'{"type":"track","messageId":"m2","userId":"u","event":"E","timestamp":"2026-11-02"}'
    ndjson = _poll(
        client, data_headers, _upload(client, data_headers, web["id"], "w.ndjson", lines)
    )
    assert (ndjson["status"], ndjson["rows_total"], ndjson["accepted"]) == ("succeeded", 2, 2)


def test_a_failing_import_is_recorded_on_its_job(
    client: TestClient, data_headers: dict[str, str], settings: Settings
) -> None:
    source = create_source(client, data_headers, name="crm", kind="file", mapping=CRM_MAPPING)
    wrong = b"id,when\n1,2026-11-01\n"
    failed = _poll(
        client, data_headers, _upload(client, data_headers, source["id"], "x.csv", wrong)
    )
    assert failed["status"] == "failed"
    assert "lacks mapped columns" in failed["error"]
    assert failed["finished_at"] is not None
    # Its uploaded file is gone once the job ended.
    assert list((settings.data_dir / "uploads").iterdir()) == []


def test_uploads_are_refused_at_once_for_a_bad_type_or_source(
    client: TestClient, data_headers: dict[str, str], settings: Settings
) -> None:
    source = create_source(client, data_headers, name="crm", kind="file", mapping=CRM_MAPPING)
    url = f"/api/sources/{source['id']}/uploads"
    unsupported = client.post(url, files={"file": ("crm.xlsx", b"x")}, headers=data_headers)
    assert unsupported.status_code == 422
    client.post(f"/api/sources/{source['id']}/disable", headers=data_headers)
    disabled = client.post(url, files={"file": ("crm.csv", CSV.encode())}, headers=data_headers)
    assert disabled.status_code == 409
    missing = client.post(
        "/api/sources/nope/uploads", files={"file": ("crm.csv", CSV.encode())}, headers=data_headers
    )
    assert missing.status_code == 404
    assert list((settings.data_dir / "uploads").iterdir()) == []


def test_queued_uploads_survive_a_stop_and_interrupted_ones_are_failed(
    settings: Settings, db: Database, data_headers: dict[str, str]
) -> None:
    source_id = _crm(db)
    uploads = settings.data_dir / "uploads"
    uploads.mkdir()
    waiting = uploads / "waiting.csv"
    waiting.write_text(CSV)
    queued = service.queue_upload(db, source_id=source_id, path=waiting, name="crm.csv")
    half = uploads / "half.csv"
    half.write_text(CSV)
    with db.begin() as session:  # left `running` by a server that died
        session.add(
            ImportRun(
                id="interrupted",
                source_id=source_id,
                channel="file",
                name="half.csv",
                status="running",
                started_at=utcnow(),
                file_path=str(half),
            )
        )
    app = create_app(settings, db=db, start_scheduler=False)
    with TestClient(app) as client:
        done = _poll(client, data_headers, {"id": queued.id, "source_id": source_id})
        assert (done["status"], done["accepted"]) == ("succeeded", 3)
        crashed = client.get(
            f"/api/sources/{source_id}/imports/interrupted", headers=data_headers
        ).json()
        assert crashed["status"] == "failed"
        assert "interrupted" in crashed["error"]
    assert not waiting.exists()
    assert not half.exists()
