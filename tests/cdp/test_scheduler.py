"""Jobs: runs are recorded; the scheduler persists and fires jobs; the API runs them."""

from __future__ import annotations

import logging
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select

from cdp.auth import ApiKey, Role, key_uses
from cdp.config import Settings
from cdp.db import Database
from cdp.errors import Conflict, NotFound
from cdp.scheduler import (
    FOUNDATION_JOBS,
    JobContext,
    JobRun,
    JobRunner,
    JobSpec,
    Scheduler,
    describe_schedule,
)
from cdp.warehouse import Query, Warehouse
from tests.conftest import BACKENDS, make_key


def _count_events(context: JobContext) -> int:
    return int(context.warehouse.scalar(Query("SELECT count(*) + 7 FROM events")))


def _fail(context: JobContext) -> int:
    raise ValueError("source unreachable")


@pytest.fixture
def runner(settings: Settings, db: Database, warehouse: Warehouse) -> JobRunner:
    """A runner with a succeeding and a failing job."""
    job_runner = JobRunner(settings, db, warehouse)
    job_runner.register(
        JobSpec("count", _count_events, "count events"),
        JobSpec("fail", _fail, "always fails"),
    )
    return job_runner


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_runs_are_recorded_with_outcome_and_rows(runner: JobRunner, db: Database) -> None:
    ok = runner.run("count", trigger="manual")
    bad = runner.run("fail", trigger="cli")
    with db.begin() as session:
        stored = {r.job: r for r in session.query(JobRun).all()}
    assert stored["count"].status == "succeeded"
    assert stored["count"].rows == 7
    assert stored["count"].finished_at is not None
    assert stored["count"].started_at <= stored["count"].finished_at
    assert stored["fail"].status == "failed"
    assert stored["fail"].error == "ValueError: source unreachable"
    assert (ok.id, bad.id) == (stored["count"].id, stored["fail"].id)


def test_idle_scheduled_runs_are_not_kept_but_manual_ones_are(
    settings: Settings, db: Database, warehouse: Warehouse, caplog: pytest.LogCaptureFixture
) -> None:
    job_runner = JobRunner(settings, db, warehouse)
    job_runner.register(JobSpec("idle", lambda context: 0, "finds nothing to do"))
    job_runner.register(JobSpec("busy", lambda context: 3, "finds three rows"))
    with caplog.at_level(logging.INFO, logger="cdp.scheduler"):
        job_runner.run("idle", trigger="schedule")
        job_runner.run("idle", trigger="manual")
        job_runner.run("busy", trigger="schedule")
    with db.begin() as session:
        runs = session.query(JobRun).filter_by(job="idle").all()
    assert [r.trigger for r in runs] == ["manual"]
    # Nor logged at INFO: only the runs that are kept say they finished.
    finished = [
        (r.job, r.rows)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "cdp.scheduler" and r.levelno >= logging.INFO
    ]
    assert finished == [("idle", 0), ("busy", 3)]


def test_unknown_job_is_not_found(runner: JobRunner) -> None:
    with pytest.raises(NotFound):
        runner.run("nope", trigger="manual")


def test_a_job_does_not_run_twice_at_once(
    settings: Settings, db: Database, warehouse: Warehouse
) -> None:
    started, release = threading.Event(), threading.Event()

    def slow(context: JobContext) -> int:
        started.set()
        release.wait(timeout=30)
        return 1

    job_runner = JobRunner(settings, db, warehouse)
    job_runner.register(JobSpec("slow", slow, "slow"))
    first = job_runner.submit("slow", trigger="manual")
    assert first.status == "running"
    assert started.wait(timeout=30)
    with pytest.raises(Conflict):
        job_runner.run("slow", trigger="manual")
    release.set()
    job_runner.shutdown()
    with db.begin() as session:
        finished = session.get(JobRun, first.id)
        assert finished is not None
        assert finished.status == "succeeded"


def test_scheduler_persists_jobs_in_the_database_and_fires_them(
    settings: Settings, db: Database, warehouse: Warehouse
) -> None:
    fired = threading.Event()

    def tick(context: JobContext) -> int:
        fired.set()
        return 3

    job_runner = JobRunner(settings, db, warehouse)
    job_runner.register(
        JobSpec("tick", tick, "ticks", trigger="interval", trigger_args={"seconds": 1})
    )
    scheduler = Scheduler(job_runner)
    scheduler.start()
    try:
        assert "apscheduler_jobs" in inspect(db.engine).get_table_names()
        assert scheduler.next_run_times()["tick"] is not None
        assert fired.wait(timeout=30), "the scheduled job never ran"
    finally:
        scheduler.shutdown()
        job_runner.shutdown()
    with db.begin() as session:
        runs = session.query(JobRun).filter_by(job="tick").all()
    assert runs
    assert runs[0].trigger == "schedule"
    assert runs[0].rows == 3


def test_a_new_keys_first_request_can_run_a_job_and_wait(client: TestClient, db: Database) -> None:
    headers = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}
    run = client.post("/api/jobs/warehouse.checkpoint/run?wait=true", headers=headers)
    assert run.status_code == 202, run.text
    assert run.json()["status"] == "succeeded"
    assert key_uses(db).flush(timeout=30)
    with db.begin() as session:
        assert session.scalar(select(ApiKey.last_used_at)) is not None


def test_jobs_api_lists_triggers_and_pages_runs(
    client: TestClient, admin_headers: dict[str, str]
) -> None:
    jobs = {j["name"]: j for j in client.get("/api/jobs", headers=admin_headers).json()}
    assert jobs["warehouse.checkpoint"]["schedule"] == "every 15 min"
    assert jobs["warehouse.checkpoint"]["trigger_args"] == {"minutes": 15}
    assert jobs["loyalty.expire_points"]["schedule"] == "daily at 02:00 UTC"
    assert jobs["identity.resolve"]["schedule"] == "every 5 s"
    assert jobs["store.checkpoint"]["schedule"] == "every 10 s"
    run = client.post("/api/jobs/warehouse.checkpoint/run?wait=true", headers=admin_headers)
    assert run.status_code == 202
    assert run.json()["status"] == "succeeded"
    for _ in range(2):
        client.post("/api/jobs/warehouse.checkpoint/run?wait=true", headers=admin_headers)
    page = client.get("/api/jobs/runs?limit=2", headers=admin_headers).json()
    assert page["total"] == 3
    assert len(page["items"]) == 2
    assert page["next_offset"] == 2
    one = client.get(f"/api/jobs/runs/{run.json()['id']}", headers=admin_headers)
    assert one.json()["job"] == "warehouse.checkpoint"
    missing = client.post("/api/jobs/nope/run", headers=admin_headers)
    assert missing.status_code == 404
    store = client.post("/api/jobs/store.checkpoint/run?wait=true", headers=admin_headers)
    assert (store.status_code, store.json()["status"]) == (202, "succeeded")


def test_schedules_read_as_words() -> None:
    assert describe_schedule(None, {}) == "manual"
    assert describe_schedule("interval", {"seconds": 1}) == "every 1 s"
    assert describe_schedule("interval", {"hours": 1, "minutes": 30}) == "every 1 h 30 min"
    assert describe_schedule("cron", {"hour": 3, "minute": 0}) == "daily at 03:00 UTC"
    assert describe_schedule("cron", {"minute": 7}) == "hourly at :07"
    assert describe_schedule("cron", {"day_of_week": "mon", "hour": 4}) == (
        "cron day_of_week=mon, hour=4"
    )


def test_a_routine_store_checkpoint_leaves_no_run_record_and_a_busy_one_does(
    settings: Settings, db: Database, warehouse: Warehouse
) -> None:
    runner = JobRunner(settings, db, warehouse)
    runner.register(*FOUNDATION_JOBS)
    try:
        make_key(db, Role.viewer)
        routine = runner.run("store.checkpoint", trigger="schedule")
        assert (routine.status, routine.message) == ("succeeded", None)
        # A reader holding an old snapshot while a write lands keeps the log from truncating.
        reader = db.engine.raw_connection()
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM cdp_job_run").fetchone()
            make_key(db, Role.viewer)
            busy = runner.run("store.checkpoint", trigger="schedule")
        finally:
            reader.rollback()
            reader.close()
    finally:
        runner.shutdown()
    assert busy.message is not None
    with db.begin() as session:
        kept = list(session.scalars(select(JobRun.id).where(JobRun.job == "store.checkpoint")))
    assert kept == [busy.id]
