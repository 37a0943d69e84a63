"""Background jobs: a registry of named jobs, APScheduler wiring and a record of every run.

Domains describe their jobs as `JobSpec`s; the composition root registers them. APScheduler
keeps its schedule in the operational database (`apscheduler_jobs`, owned by APScheduler),
and every run, scheduled or manual, is recorded in `cdp_job_run`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from cdp.auth import ADMIN, ANY_ROLE, require
from cdp.config import Settings
from cdp.db import Base, Database, SessionDep, UtcDateTime, new_id, utcnow
from cdp.errors import Conflict, NotFound
from cdp.pagination import Page, PageDep, paginate
from cdp.warehouse import Query as SqlQuery
from cdp.warehouse import Warehouse

logger = logging.getLogger(__name__)

RunStatus = Literal["running", "succeeded", "failed"]
RunTrigger = Literal["schedule", "manual", "cli"]


@dataclass(slots=True)
class JobContext:
    """What a running job gets: the stores, the settings, and a way to report progress."""

    settings: Settings
    db: Database
    warehouse: Warehouse
    run_id: str
    rows: int = 0
    message: str | None = None


JobFunc = Callable[[JobContext], int | None]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A named job: what it runs and when (an APScheduler trigger, or manual only)."""

    name: str
    func: JobFunc
    description: str
    trigger: str | None = None
    trigger_args: dict[str, Any] = field(default_factory=dict)  # Any: APScheduler trigger args

    @property
    def schedule(self) -> str:
        """When the job runs, for people: `every 5 s`, `daily at 02:00 UTC`, `manual`."""
        return describe_schedule(self.trigger, self.trigger_args)


_UNITS = {"weeks": "w", "days": "d", "hours": "h", "minutes": "min", "seconds": "s"}


def describe_schedule(trigger: str | None, args: dict[str, Any]) -> str:  # Any: trigger args
    """An APScheduler trigger in words (the scheduler runs in UTC)."""
    if trigger is None:
        return "manual"
    if trigger == "interval" and args and set(args) <= set(_UNITS):
        return "every " + " ".join(f"{args[k]} {_UNITS[k]}" for k in _UNITS if k in args)
    if trigger == "cron" and set(args) == {"hour", "minute"}:
        return f"daily at {int(args['hour']):02d}:{int(args['minute']):02d} UTC"
    if trigger == "cron" and set(args) == {"minute"}:
        return f"hourly at :{int(args['minute']):02d}"
    return f"{trigger} " + ", ".join(f"{k}={v}" for k, v in sorted(args.items()))


class JobRun(Base):
    """One run of a job: when, how it ended, and how many rows it handled."""

    __tablename__ = "cdp_job_run"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job: Mapped[str] = mapped_column(String(100), index=True)
    trigger: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    rows: Mapped[int | None] = mapped_column(Integer)
    message: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)


class JobRunner:
    """Runs registered jobs, one at a time per job, and records each run."""

    def __init__(self, settings: Settings, db: Database, warehouse: Warehouse) -> None:
        self.settings = settings
        self.db = db
        self.warehouse = warehouse
        self.specs: dict[str, JobSpec] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cdp-job")

    def register(self, *specs: JobSpec) -> None:
        """Add jobs to the registry."""
        for spec in specs:
            if spec.name in self.specs:
                raise ValueError(f"job {spec.name} is registered twice")
            self.specs[spec.name] = spec
            self._locks[spec.name] = threading.Lock()

    def spec(self, name: str) -> JobSpec:
        """The job of this name, or NotFound."""
        try:
            return self.specs[name]
        except KeyError:
            raise NotFound(f"no job named {name!r}") from None

    def run(self, name: str, *, trigger: RunTrigger) -> JobRun:
        """Run a job now in this thread and return its finished record."""
        spec = self.spec(name)
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            raise Conflict(f"job {name} is already running")
        try:
            run_id = self._start(name, trigger)
            return self._execute(spec, run_id, trigger)
        finally:
            lock.release()

    def submit(self, name: str, *, trigger: RunTrigger) -> JobRun:
        """Start a job in the background and return its record in state `running`."""
        spec = self.spec(name)
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            raise Conflict(f"job {name} is already running")
        try:
            run_id = self._start(name, trigger)
        except BaseException:
            lock.release()
            raise

        def work() -> JobRun:
            try:
                return self._execute(spec, run_id, trigger)
            finally:
                lock.release()

        self._pool.submit(work)
        with self.db.begin() as session:
            run = session.get(JobRun, run_id)
            assert run is not None
            return run

    def _start(self, name: str, trigger: RunTrigger) -> str:
        run_id = new_id()
        with self.db.begin() as session:
            session.add(
                JobRun(id=run_id, job=name, trigger=trigger, status="running", started_at=utcnow())
            )
        logger.debug("job started", extra={"job": name, "run_id": run_id, "trigger": trigger})
        return run_id

    def _execute(self, spec: JobSpec, run_id: str, trigger: RunTrigger) -> JobRun:
        context = JobContext(self.settings, self.db, self.warehouse, run_id)
        status: RunStatus = "succeeded"
        error: str | None = None
        try:
            rows = spec.func(context)
            if rows is not None:
                context.rows = rows
        except Exception as exc:  # recorded and logged; a job failure must not kill the scheduler
            status = "failed"
            error = f"{type(exc).__name__}: {exc}"
            logger.exception("job failed", extra={"job": spec.name, "run_id": run_id})
        with self.db.begin() as session:
            run = session.get(JobRun, run_id)
            assert run is not None
            run.status = status
            run.finished_at = utcnow()
            run.rows = context.rows
            run.message = context.message
            run.error = error
            # Jobs that poll every second or few (loyalty, identity) would fill the table with
            # runs that found nothing to do: a scheduled run that succeeded idle is not kept.
            idle = trigger == "schedule" and status == "succeeded"
            idle = idle and not (run.rows or run.message)
            if idle:
                session.delete(run)
        # Idle scheduled runs are logged at DEBUG too: at INFO, the jobs polling every second
        # wrote two lines a second that said nothing.
        logger.log(
            logging.DEBUG if idle else logging.INFO,
            "job finished",
            extra={"job": spec.name, "run_id": run_id, "status": status, "rows": context.rows},
        )
        return run

    def shutdown(self) -> None:
        """Wait for background runs to finish."""
        self._pool.shutdown(wait=True)


# APScheduler stores jobs by a textual reference to a module-level function; this is the
# runner that function reaches. One scheduler runs per process.
_ACTIVE_RUNNER: JobRunner | None = None


def run_scheduled(name: str) -> None:
    """Entry point APScheduler calls for every scheduled run."""
    runner = _ACTIVE_RUNNER
    if runner is None:
        logger.warning("scheduled job fired with no active runner", extra={"job": name})
        return
    try:
        runner.run(name, trigger="schedule")
    except Conflict:
        logger.info("scheduled run skipped: job still running", extra={"job": name})


class Scheduler:
    """APScheduler in the server process, with its job store in the operational database."""

    def __init__(self, runner: JobRunner) -> None:
        self.runner = runner
        self._scheduler: BackgroundScheduler | None = None

    @property
    def running(self) -> bool:
        """Whether the scheduler is started."""
        return self._scheduler is not None and bool(self._scheduler.running)

    def start(self) -> None:
        """Start APScheduler and (re)install every scheduled job of the registry."""
        global _ACTIVE_RUNNER
        if self._scheduler is not None:
            return
        _ACTIVE_RUNNER = self.runner
        store = SQLAlchemyJobStore(engine=self.runner.db.engine)
        scheduler = BackgroundScheduler(
            jobstores={"default": store},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
            timezone="UTC",
        )
        scheduler.start(paused=True)
        wanted = {s.name for s in self.runner.specs.values() if s.trigger}
        for job in scheduler.get_jobs():
            if job.id not in wanted:
                job.remove()
        for spec in self.runner.specs.values():
            if spec.trigger is None:
                continue
            scheduler.add_job(
                "cdp.scheduler:run_scheduled",
                trigger=spec.trigger,
                args=[spec.name],
                id=spec.name,
                name=spec.description,
                replace_existing=True,
                **spec.trigger_args,
            )
        scheduler.resume()
        self._scheduler = scheduler
        logger.info("scheduler started", extra={"jobs": sorted(wanted)})

    def next_run_times(self) -> dict[str, datetime | None]:
        """The next planned run of each scheduled job."""
        if self._scheduler is None:
            return {}
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    def shutdown(self) -> None:
        """Stop APScheduler, letting running jobs finish."""
        global _ACTIVE_RUNNER
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if _ACTIVE_RUNNER is self.runner:
            _ACTIVE_RUNNER = None


def list_runs(
    session: Session, *, job: str | None, status: str | None, limit: int, offset: int
) -> tuple[list[JobRun], int]:
    """Runs, newest first, optionally of one job or one status."""
    query = select(JobRun)
    if job:
        query = query.where(JobRun.job == job)
    if status:
        query = query.where(JobRun.status == status)
    return paginate(session, query, JobRun.started_at.desc(), JobRun.id, limit=limit, offset=offset)


def get_run(session: Session, *, run_id: str) -> JobRun:
    """The run with this id, or NotFound."""
    run = session.get(JobRun, run_id)
    if run is None:
        raise NotFound(f"job run {run_id} does not exist")
    return run


def checkpoint_warehouse(context: JobContext) -> int:
    """Flush DuckDB's write-ahead log into the database file."""
    context.warehouse.execute(SqlQuery("CHECKPOINT"))
    return 0


def checkpoint_store(context: JobContext) -> int:
    """SQLite: copy the operational store's write-ahead log into its file and truncate it
    (`Database.checkpoint_wal`). Only a run that could not finish (readers or a writer held
    the log past its short wait; the next run tries again) leaves a record: a routine one
    every 10 s would add 8,640 runs a day."""
    done = context.db.checkpoint_wal()
    if done is not None and done.busy:
        context.message = "the log is in use: not truncated, tried again at the next run"
    return 0


FOUNDATION_JOBS = (
    JobSpec(
        name="store.checkpoint",
        func=checkpoint_store,
        description="Checkpoint and truncate the operational store's write-ahead log (SQLite)",
        trigger="interval",
        trigger_args={"seconds": 10},
    ),
    JobSpec(
        name="warehouse.checkpoint",
        func=checkpoint_warehouse,
        description="Checkpoint the warehouse write-ahead log",
        trigger="interval",
        trigger_args={"minutes": 15},
    ),
)


class JobRead(BaseModel):
    """A registered job."""

    name: str
    description: str
    schedule: str = Field(
        description="When it runs, in words: `every 5 s`, `daily at 02:00 UTC`, `manual`"
    )
    trigger: str | None = Field(
        description="APScheduler trigger (`interval`, `cron`); null: manual"
    )
    trigger_args: dict[str, Any] = Field(description="The trigger's arguments, e.g. {'hour': 2}")
    next_run_at: datetime | None


class JobRunRead(BaseModel):
    """A recorded run of a job."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    job: str
    trigger: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    rows: int | None
    message: str | None
    error: str | None


def get_runner(request: Request) -> JobRunner:
    """The job runner of the running app."""
    runner: JobRunner = request.app.state.runner
    return runner


RunnerDep = Annotated[JobRunner, Depends(get_runner)]

router = APIRouter(prefix="/api/jobs", tags=["jobs"], dependencies=[Depends(require(*ANY_ROLE))])


@router.get("")
def list_jobs(request: Request, runner: RunnerDep) -> list[JobRead]:
    """Every registered job with its schedule and next run time."""
    scheduler: Scheduler | None = getattr(request.app.state, "scheduler", None)
    next_runs = scheduler.next_run_times() if scheduler else {}
    return [
        JobRead(
            name=spec.name,
            description=spec.description,
            schedule=spec.schedule,
            trigger=spec.trigger,
            trigger_args=spec.trigger_args,
            next_run_at=next_runs.get(spec.name),
        )
        for spec in sorted(runner.specs.values(), key=lambda s: s.name)
    ]


@router.get("/runs")
def list_job_runs(
    session: SessionDep,
    page: PageDep,
    job: Annotated[str | None, Query(description="Only runs of this job")] = None,
    status: Annotated[RunStatus | None, Query(description="Only runs in this state")] = None,
) -> Page[JobRunRead]:
    """Recorded job runs, newest first."""
    rows, total = list_runs(session, job=job, status=status, limit=page.limit, offset=page.offset)
    return Page[JobRunRead].of(
        [JobRunRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.get("/runs/{run_id}")
def get_job_run(run_id: str, session: SessionDep) -> JobRunRead:
    """One recorded job run."""
    return JobRunRead.model_validate(get_run(session, run_id=run_id))


@router.post("/{name}/run", status_code=202, dependencies=[Depends(ADMIN)])
def trigger_job(
    name: str,
    runner: RunnerDep,
    wait: Annotated[bool, Query(description="Answer only when the run has finished")] = False,
) -> JobRunRead:
    """Run a job now (admin). Returns the run record; poll it unless `wait=true`."""
    run = runner.run(name, trigger="manual") if wait else runner.submit(name, trigger="manual")
    return JobRunRead.model_validate(run)
