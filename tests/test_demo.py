"""`cdp demo` end to end: a real process loads the sample data and serves it; reruns add nothing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cdp.app import create_app
from cdp.config import Settings
from cdp.db import Database
from cdp.demo import (
    LOYALTY_JOB,
    DemoSources,
    DemoSummary,
    HistoryNotReady,
    backfill_program,
    resolve_history,
)
from cdp.sample_data import CRM_FILE, SOURCE_CRM, SOURCE_TILL, SOURCE_WEB, WEB_FILE
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from ingestion import service as ingestion_service
from ingestion.drainer import Drainer
from ingestion.loader import loader_for
from ingestion.spool import Spool
from ingestion.tracking import SourceInfo, parse_messages
from ingestion.writer import combine
from loyalty import service as loyalty_service
from segments.service import STATE_PROPERTY_VALUES

CUSTOMERS = 300
CDP_DEMO = (sys.executable, "-m", "cdp.cli", "demo")
KEY_LINE = re.compile(r"^Admin API key: (\S+)$", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    url: str
    key: str
    output: str
    data_dir: Path

    def get(self, path: str, **params: Any) -> Any:  # Any: JSON
        response = httpx.get(
            f"{self.url}{path}",
            params=params,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it received.
        assert self.proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert not (self.data_dir / "warehouse.duckdb.holder.json").exists()


def _start(data_dir: Path, port: int) -> Demo:
    """Run `cdp demo` and wait until it printed its admin key and answers `/readyz`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update({"CDP_DATA_DIR": str(data_dir), "CDP_LOG_JSON": "false"})
    stdout = data_dir.parent / f"demo-{port}.out"
    stderr = data_dir.parent / f"demo-{port}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        proc = subprocess.Popen(
            [*CDP_DEMO, "--customers", str(CUSTOMERS), "--port", str(port)],
            env=env,
            stdout=out,
            stderr=err,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}: {stderr.read_text()}")
        found = KEY_LINE.search(stdout.read_text())
        if found:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    return Demo(proc, url, found.group(1), stdout.read_text(), data_dir)
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"demo did not become ready: {stderr.read_text()[-3000:]}")


def _sources(demo: Demo) -> dict[str, dict[str, Any]]:  # Any: JSON
    page = demo.get("/api/sources", limit=100)
    return {s["name"]: s for s in page["items"]}


def _stats(demo: Demo, sources: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: demo.get(f"/api/sources/{s['id']}/stats") for n, s in sources.items()}


def _wait_web_received(demo: Demo, source_id: str, expected: int) -> dict[str, Any]:
    """Wait for the background replay: the web source has received `expected` messages."""
    end = time.monotonic() + 60
    stats: dict[str, Any] = {}
    while time.monotonic() < end:
        stats = demo.get(f"/api/sources/{source_id}/stats")
        if stats["received"] >= expected:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"the web replay did not arrive: {stats}")


def _wait_program_backfilled(demo: Demo) -> list[dict[str, Any]]:  # Any: JSON
    """Wait for the background backfill: the programme's mark moves once it is done."""
    end = time.monotonic() + 60
    programs: list[dict[str, Any]] = []  # Any: JSON
    while time.monotonic() < end:
        programs = demo.get("/api/loyalty/programs")["items"]
        if programs and all(p["last_event_id"] > 0 for p in programs):
            return programs
        time.sleep(0.2)
    raise AssertionError(f"the demo programme was not backfilled: {programs}")


def _wait_snapshots_after_history(demo: Demo) -> dict[str, Any]:  # Any: JSON
    """Wait for the KPI snapshot run the demo starts once the replay and backfill are done."""
    end = time.monotonic() + 60
    runs: list[dict[str, Any]] = []  # Any: JSON
    while time.monotonic() < end:
        runs = demo.get("/api/jobs/runs", job="dashboards.kpi_snapshots")["items"]
        done = [r for r in runs if r["trigger"] == "manual" and r["status"] != "running"]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"the demo took no KPI snapshots after its history: {runs}")


def _instant(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _crm_email(data_dir: Path) -> str:
    crm = pl.read_csv(data_dir / "sample" / CRM_FILE, infer_schema_length=0)
    clean = crm.filter(
        pl.col("email").str.contains(r"^[a-z0-9._]+@[a-z0-9.]+\.[a-z]+$")
        & (pl.col("email") != "test@test.com")
    )
    return str(clean["email"][0])


def _positive_member(demo: Demo, program_id: str) -> tuple[str, int]:
    members = demo.get(f"/api/loyalty/programs/{program_id}/members", limit=100)["items"]
    for member in members:
        balance = demo.get(f"/api/loyalty/members/{member['id']}/balance")
        if balance["total"] > 0:
            return member["id"], int(balance["total"])
    raise AssertionError("no member has points")


def test_demo_loads_the_sample_through_the_platform_and_a_rerun_adds_nothing(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    demo = _start(data_dir, _free_port())
    try:
        with (data_dir / "sample" / WEB_FILE).open("rb") as web:
            web_lines = sum(1 for _ in web)
        sources = _sources(demo)
        assert set(sources) == {SOURCE_CRM, SOURCE_TILL, SOURCE_WEB}
        _wait_web_received(demo, sources[SOURCE_WEB]["id"], web_lines)
        first = _stats(demo, sources)
        assert all(s["accepted"] > 0 for s in first.values()), first
        assert first[SOURCE_WEB]["accepted"] + first[SOURCE_WEB]["rejected"] == web_lines

        email = _crm_email(data_dir)
        profile = demo.get("/api/profiles/lookup", kind="email", value=email.upper())
        assert profile["id"]

        programs = _wait_program_backfilled(demo)
        assert [p["name"] for p in programs] == ["Demo Club"]
        _, points = _positive_member(demo, programs[0]["id"])
        assert points > 0
        # The programme earned only once the whole replay was loaded (and resolved): earning
        # during it enrolled profiles that a later web event merged, as timing had it.
        web = demo.get(f"/api/sources/{sources[SOURCE_WEB]['id']}/stats")
        runs = demo.get("/api/jobs/runs", job=LOYALTY_JOB, limit=100)["items"]
        earning = [_instant(r["started_at"]) for r in runs if r["rows"]]
        assert earning, runs
        assert min(earning) >= _instant(web["last_event_at"])
        merged = demo.get(f"/api/loyalty/programs/{programs[0]['id']}/members", status="merged")
        assert merged["total"] == 0

        # The sample history is old: its closed days are snapshotted by event time.
        snapshot_rows = re.search(r"KPI snapshot rows written: (\d+)", demo.output)
        assert snapshot_rows is not None
        assert int(snapshot_rows.group(1)) > 0
        after_history = _wait_snapshots_after_history(demo)
        assert after_history["status"] == "succeeded", after_history
        assert after_history["rows"] > 0  # the ledger's history and the web events' days

        segments = {s["name"] for s in demo.get("/api/segments")["items"]}
        assert segments == {"High spenders", "Lapsed buyers", "Regular buyers"}
        assert "/docs" in demo.output
        assert "/dashboards" in demo.output
    finally:
        demo.stop()

    # The demo refreshed everything segments derive, the stored order property values too.
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        mark = warehouse.scalar(
            Query("SELECT text FROM segment_state WHERE name = $n", {"n": STATE_PROPERTY_VALUES})
        )
        assert mark is not None
        assert int(mark) > 0
        assert warehouse.scalar(Query("SELECT count(*) FROM segment_property_values")) > 0

    again = _start(data_dir, _free_port())
    try:
        assert again.key != demo.key
        revoked = httpx.get(
            f"{again.url}/api/sources", headers={"Authorization": f"Bearer {demo.key}"}, timeout=5
        )
        assert revoked.status_code == 401
        sources_again = _sources(again)
        assert {n: s["id"] for n, s in sources_again.items()} == {
            n: s["id"] for n, s in sources.items()
        }
        stats = _wait_web_received(again, sources[SOURCE_WEB]["id"], 2 * web_lines)
        assert stats["accepted"] == first[SOURCE_WEB]["accepted"]
        second = _stats(again, sources_again)
        for name in (SOURCE_CRM, SOURCE_TILL):
            assert second[name]["accepted"] == first[name]["accepted"]
            assert second[name]["received"] == first[name]["received"]
        assert "already imported" in again.output
        programs_again = _wait_program_backfilled(again)
        assert [p["id"] for p in programs_again] == [programs[0]["id"]]
        assert "already there" in again.output
        members = again.get(f"/api/loyalty/programs/{programs[0]['id']}/members", limit=500)
        profiles = [m["profile_id"] for m in members["items"]]
        assert len(profiles) == members["total"] > 0
        assert len(set(profiles)) == len(profiles)
        segments_again = again.get("/api/segments")["items"]
        assert sorted(s["name"] for s in segments_again) == sorted(segments)
    finally:
        again.stop()


# The history step of the demo, on a real app: its tracking API, drainer, identity and runner.
ORDER_AT = "2025-01-10T10:00:00Z"


def _order(message_id: str, order_id: str, **who: str) -> dict[str, Any]:  # Any: JSON
    products = [{"sku": "s1", "category": "bags", "price": 40.0, "quantity": 1}]
    return {
        "type": "track",
        "event": "Order Completed",
        "messageId": message_id,
        "timestamp": ORDER_AT,
        "properties": {"order_id": order_id, "revenue": 40.0, "total": 40.0, "products": products},
        **who,
    }


# A customer's till order under their user id, their web order under a device's anonymous id,
# and the later login that tells identity both are the same person.
USER_ORDER = _order("m1", "o1", userId="u1")
DEVICE_ORDER = _order("m2", "o2", anonymousId="a1")
LOGIN = {
    "type": "identify",
    "messageId": "m3",
    "timestamp": "2025-01-12T10:00:00Z",
    "userId": "u1",
    "anonymousId": "a1",
}


@pytest.fixture
def held_app(settings: Settings, db: Database, warehouse: Warehouse) -> FastAPI:
    """The app, its drainer loading acknowledged events only when someone waits for them."""
    held = settings.model_copy(
        update={"ingestion": settings.ingestion.model_copy(update={"drain_interval_ms": 1e12})}
    )
    return create_app(held, db=db, warehouse=warehouse, start_scheduler=False)


def _track(client: TestClient, write_key: str, *messages: dict[str, Any]) -> None:  # Any: JSON
    response = client.post("/v1/batch", json={"batch": list(messages)}, auth=(write_key, ""))
    assert response.status_code == 200, response.text
    assert "rejected" not in response.json()


def _demo_summary(db: Database) -> tuple[DemoSummary, str]:
    """A demo summary with a new draft demo programme, and the web source's write key."""
    with db.begin() as session:
        web, key = ingestion_service.create_source(session, name="web", kind="http")
        program = loyalty_service.create_demo_program(session, status="draft")
        program_id = program.id
    assert key is not None
    summary = DemoSummary(sources=DemoSources("crm", "till", web.id, key))
    summary.program_id, summary.program_created = program_id, True
    return summary, key


def _events(warehouse: Warehouse) -> int:
    return int(warehouse.scalar(Query("SELECT count(*) FROM events")))


def _member_statuses(db: Database, program_id: str) -> list[str]:
    with db.begin() as session:
        members, _ = loyalty_service.list_members(
            session, program_id=program_id, limit=100, offset=0
        )
        return sorted(m.status for m in members)


def test_resolve_history_waits_for_the_acknowledged_events_and_resolves_them(
    held_app: FastAPI, db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    summary, key = _demo_summary(db)
    said: list[str] = []
    with TestClient(held_app) as client:
        _track(client, key, USER_ORDER, DEVICE_ORDER, LOGIN)
        assert _events(warehouse) == 0  # acknowledged, still in the spool
        loaded = resolve_history(
            db, warehouse, settings, tracking=held_app.state.ingestion, say=said.append
        )
        assert loaded == _events(warehouse) == 3
        assert identity_service.resolved_up_to(warehouse) == 3
        backfill_program(db, warehouse, held_app.state.runner, summary, say=said.append)
    # The backfill saw the login: one person, one membership.
    assert summary.members == 1
    assert _member_statuses(db, summary.program_id) == ["active"]
    assert said[0].startswith("history loaded and resolved in ")
    assert said[0].endswith("events up to 3, 1 profiles")


def test_earning_before_a_linking_event_is_resolved_leaves_a_merged_membership(
    held_app: FastAPI, db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    # The race the demo had: its backfill ran while the web replay was still being resolved.
    summary, key = _demo_summary(db)
    with TestClient(held_app) as client:
        runtime, runner = held_app.state.ingestion, held_app.state.runner
        _track(client, key, USER_ORDER, DEVICE_ORDER)
        resolve_history(db, warehouse, settings, tracking=runtime, say=lambda _: None)
        backfill_program(db, warehouse, runner, summary, say=lambda _: None)
        assert summary.members == 2
        _track(client, key, LOGIN)
        resolve_history(db, warehouse, settings, tracking=runtime, say=lambda _: None)
        assert runner.run(LOYALTY_JOB, trigger="manual").status == "succeeded"
    # Same events, same profiles in the end, yet the count now holds the merged membership.
    assert _member_statuses(db, summary.program_id) == ["active", "merged"]


def test_resolve_history_fails_loudly_when_the_events_are_not_loaded_in_time(
    db: Database, warehouse: Warehouse, settings: Settings, tmp_path: Path
) -> None:
    # A drainer whose thread never runs: what it was handed is never loaded.
    drainer = Drainer(loader_for(warehouse), Spool(tmp_path / "spool"), interval_s=0, max_events=10)
    drainer.replay()
    parsed = parse_messages(
        {"batch": [USER_ORDER]},
        [USER_ORDER],
        source=SourceInfo(id="web", enabled=True),
        received_at=datetime.now(UTC).replace(tzinfo=None),
        region="FR",
        check_sizes=False,
    )
    data = combine([("web", parsed, datetime.now(UTC).replace(tzinfo=None))])
    drainer.add(drainer.spool.append(data), data, data.events.height)
    said: list[str] = []
    with pytest.raises(HistoryNotReady, match="not all loaded"):
        resolve_history(db, warehouse, settings, tracking=drainer, timeout=0.05, say=said.append)
    assert said == []
    assert identity_service.resolved_up_to(warehouse) == 0
    drainer.spool.close(0)
