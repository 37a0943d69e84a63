"""The identity jobs run through the job runner, as the scheduler and `cdp jobs run` run them."""

from __future__ import annotations

from sqlalchemy import select

from cdp.app import registered_jobs
from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRun, JobRunner
from cdp.warehouse import Query, Warehouse
from identity import service
from tests.identity.conftest import Ev, EventWriter, partition


def _runner(settings: Settings, db: Database, warehouse: Warehouse) -> JobRunner:
    """A runner with every registered job: the wiring the server's scheduler uses."""
    runner = JobRunner(settings, db, warehouse)
    runner.register(*registered_jobs())
    return runner


def _runs(db: Database, job: str) -> list[JobRun]:
    with db.begin() as session:
        return list(session.scalars(select(JobRun).where(JobRun.job == job)))


def _profile_ids(warehouse: Warehouse) -> set[str]:
    return {str(r[0]) for r in warehouse.rows(Query("SELECT profile_id FROM profiles"))}


def test_identity_jobs_are_scheduled_every_five_seconds_and_rebuild_is_manual() -> None:
    specs = {spec.name: spec for spec in registered_jobs()}
    assert (specs["identity.resolve"].trigger, specs["identity.resolve"].trigger_args) == (
        "interval",
        {"seconds": 5},
    )
    assert specs["identity.rebuild"].trigger is None


def test_resolve_job_builds_profiles_of_new_events_and_records_the_run(
    settings: Settings, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    runner = _runner(settings, db, warehouse)
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "a@x.com")], traits={"city": "Lyon"}),
            Ev([("email", "a@x.com"), ("phone", "+33612345678")]),
            Ev([("email", "b@x.com")]),
        ]
    )
    run = runner.run("identity.resolve", trigger="schedule")
    assert (run.status, run.rows, run.error) == ("succeeded", 3, None)
    assert str(run.message).startswith("incremental: 3 events")
    assert partition(warehouse) == {
        frozenset({("user_id", "u1"), ("email", "a@x.com"), ("phone", "+33612345678")}),
        frozenset({("email", "b@x.com")}),
    }
    ann = service.lookup(warehouse, kind="phone", value="+33612345678")
    assert ann is not None
    assert service.get_profile(warehouse, profile_id=ann).traits == {"city": "Lyon"}
    assert [(r.id, r.rows) for r in _runs(db, "identity.resolve")] == [(run.id, 3)]

    # Nothing new: the scheduled run changes nothing and, idle, is not kept (every 5 s).
    before = warehouse.rows(Query("SELECT * FROM profiles ORDER BY profile_id"))
    version = warehouse.rows(Query("SELECT * FROM identity_state ORDER BY ALL"))
    idle = runner.run("identity.resolve", trigger="schedule")
    assert (idle.status, idle.rows) == ("succeeded", 0)
    assert warehouse.rows(Query("SELECT * FROM profiles ORDER BY profile_id")) == before
    assert warehouse.rows(Query("SELECT * FROM identity_state ORDER BY ALL")) == version
    assert [r.id for r in _runs(db, "identity.resolve")] == [run.id]

    # Only the new events are resolved by the next run.
    events.write([Ev([("email", "b@x.com"), ("user_id", "u2")]), Ev([("user_id", "u3")])])
    later = runner.run("identity.resolve", trigger="schedule")
    assert (later.status, later.rows) == ("succeeded", 2)
    assert len(_profile_ids(warehouse)) == 3
    assert [r.rows for r in _runs(db, "identity.resolve")] == [3, 2]
    runner.shutdown()


def test_rebuild_job_gives_the_incremental_partition_and_keeps_the_ids(
    settings: Settings, db: Database, warehouse: Warehouse, events: EventWriter
) -> None:
    runner = _runner(settings, db, warehouse)
    events.write([Ev([("user_id", "u1"), ("anonymous_id", "a1")]), Ev([("email", "c@x.com")])])
    runner.run("identity.resolve", trigger="schedule")
    events.write(
        [
            Ev([("anonymous_id", "a1"), ("email", "c@x.com")]),  # merges the two profiles
            Ev([("user_id", "u9"), ("phone", "+33611111111")]),
        ]
    )
    runner.run("identity.resolve", trigger="schedule")
    incremental, ids = partition(warehouse), _profile_ids(warehouse)
    assert len(incremental) == 2

    run = runner.run("identity.rebuild", trigger="manual")
    assert (run.status, run.error) == ("succeeded", None)
    # Its rows are the identifiers it recomputed: every one of the graph.
    assert run.rows == 5
    assert str(run.message).startswith("full: 5 identifiers, 0 merges")
    assert partition(warehouse) == incremental
    assert _profile_ids(warehouse) == ids
    assert [r.rows for r in _runs(db, "identity.rebuild")] == [5]
    runner.shutdown()
