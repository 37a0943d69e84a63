"""Scheduled jobs of the loyalty package: real-time earning, expiry, tier re-evaluation."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import func, select

from cdp.db import utcnow
from cdp.registry import PerObject
from cdp.scheduler import JobContext, JobSpec
from cdp.warehouse import Warehouse
from identity import service as identity_service
from loyalty import engine, ledger, queries, service
from loyalty.models import Member, Program

logger = logging.getLogger(__name__)

SYNC_CHUNK = 5_000  # event ids per transaction of the real-time job
MAX_RUN_SECONDS = 60.0  # a real-time run takes newly loaded events in passes this long at most
# Seconds between two publications of the member-snapshot rows the jobs touched. Publishing
# at every one-second run wrote the warehouse every second, which slowed identity's own
# writes: p95 ack -> points 21 s instead of 2 s at 1,000 events/s (`loyalty_realtime`).
SNAPSHOT_EVERY = 30.0
# The scheduled republication of the whole snapshot runs every `SNAPSHOT_SLICE_SECONDS`, a
# slice at a time: each row at least every SNAPSHOT_SLICES * SNAPSHOT_SLICE_SECONDS (5 min).
SNAPSHOT_SLICES = 10
SNAPSHOT_SLICE_SECONDS = 30
SNAPSHOT_MIN_SLICE = 1_000  # memberships: a small programme is published in one run


class _SnapshotDue:
    """The memberships and profiles whose member snapshot rows are still to be republished.

    The jobs that change memberships (real-time earning, merges) add to it and publish it at
    the end of a run, at most every `SNAPSHOT_EVERY` seconds, replacing just those rows.
    While the scheduled full publish holds the snapshot they keep them for a later run rather
    than wait: real time is never held up by the snapshot.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: set[str] = set()
        self._profiles: set[str] = set()
        self._published = float("-inf")  # time.monotonic() of the last publication

    def add(self, *, members: Iterable[str] = (), profiles: Iterable[str] = ()) -> None:
        with self._lock:
            self._members.update(members)
            self._profiles.update(profiles)

    def publish(self, context: JobContext) -> int:
        """Republish the rows due (none if the last publication is under `SNAPSHOT_EVERY`
        seconds old or another publish is running); how many written."""
        with self._lock:
            if time.monotonic() - self._published < SNAPSHOT_EVERY:
                return 0
            members, profiles = self._members, self._profiles
            self._members, self._profiles = set(), set()
            if members or profiles:
                self._published = time.monotonic()
        if not members and not profiles:
            return 0
        try:
            with context.db.begin() as session:
                return service.publish_member_snapshot(
                    session, context.warehouse, members=members, profiles=profiles, wait=False
                )
        except service.SnapshotBusy:
            self.add(members=members, profiles=profiles)
            return 0
        except BaseException:
            self.add(members=members, profiles=profiles)
            raise


# One per warehouse (a process may serve several in tests), created on first use.
_dues: PerObject[Warehouse, _SnapshotDue] = PerObject(lambda _: _SnapshotDue())


def _due(context: JobContext) -> _SnapshotDue:
    return _dues(context.warehouse)


def _active_programs(context: JobContext) -> list[str]:
    with context.db.begin() as session:
        return list(session.scalars(select(Program.id).where(Program.status == "active")))


def apply_merges(context: JobContext, *, publish: bool = True) -> int:
    """Apply identity's merges, splits and erasures published since each programme's marks
    (`publish`: then republish the snapshot rows due, at most every `SNAPSHOT_EVERY`)."""
    applied = erased = 0
    for program_id in _all_programs(context):
        touched: set[str] = set()
        with context.db.begin() as session:
            applied += service.sync_merges(
                session, context.warehouse, program_id=program_id, touched=touched
            )[0]
            erased += service.sync_erasures(
                session, context.warehouse, program_id=program_id, touched=touched
            )
        _due(context).add(profiles=touched)
    if publish:
        _due(context).publish(context)
    # An idle run leaves no message, so the runner does not keep its record (every 30 s).
    if applied or erased:
        context.message = f"{applied} merges and splits applied, {erased} erasures"
    return applied + erased


def _all_programs(context: JobContext) -> list[str]:
    with context.db.begin() as session:
        return list(session.scalars(select(Program.id)))


def process_new_events(context: JobContext) -> int:
    """Award points for the events loaded since each active programme's high-water mark.

    Real time: every second. New events are resolved by identity first (incremental and
    locked, so it is safe alongside identity's own job), then identity's merges, splits and
    erasures are applied, so points land on the surviving memberships. A run takes the
    events loaded while it worked in another pass straight away, for up to
    `MAX_RUN_SECONDS`, rather than leave them for the next tick: under a steady load the
    latency is then about one pass, not a pass plus the wait for the next tick.
    """
    started = time.monotonic()
    credits = changed = 0
    while True:
        passed = _one_pass(context)
        # The rows of the memberships touched so far, at most every `SNAPSHOT_EVERY` seconds
        # however long the run (the whole snapshot is rewritten a slice at a time by its own
        # job, each row at least every 5 minutes).
        published = _due(context).publish(context)
        passed.steps.done("publish")
        logger.debug(
            "real-time pass: %d events, %d rows published; %s",
            passed.events,
            published,
            passed.steps,
        )
        credits += passed.credits
        changed += passed.changed
        if not passed.moved or time.monotonic() - started >= MAX_RUN_SECONDS:
            break
    # The job runs every second: a run that changed nothing leaves no message, so the runner
    # does not keep its record (86,400 rows a day otherwise).
    context.message = f"{credits} credits" if changed else None
    return credits


@dataclass
class _Pass:
    credits: int = 0
    changed: int = 0
    moved: bool = False  # identity resolved new events, or a programme's mark moved
    events: int = 0  # events the programmes took
    steps: engine.Steps = field(default_factory=engine.Steps)  # for the debug log


def _one_pass(context: JobContext) -> _Pass:
    passed = _Pass()
    if _has_unresolved(context):
        with context.db.begin() as session:
            rules = identity_service.get_rules(session)
        resolved = identity_service.resolve(
            context.warehouse, settings=context.settings, rules=rules
        )
        passed.moved = bool(resolved.events)
    passed.steps.done("identity")
    passed.changed += apply_merges(context, publish=False)
    passed.steps.done("merges")
    for program_id in _active_programs(context):
        mark: int | None = None
        while True:
            # Short transactions: a long history (a new programme) never holds the
            # operational store's write lock for minutes.
            with context.db.begin() as session:
                result, new_mark = service.sync_program(
                    session, context.warehouse, program_id=program_id, max_events=SYNC_CHUNK
                )
                passed.credits += result.credits
                passed.changed += result.credits + result.reversals + result.enrolled
                passed.events += result.events
                _due(context).add(members=result.members)
                passed.steps.done("sync")
            passed.steps.done("commit")
            passed.moved = passed.moved or result.events > 0
            if new_mark == mark:
                break
            mark = new_mark
    return passed


def _has_unresolved(context: JobContext) -> bool:
    loaded = int(context.warehouse.scalar(queries.max_event_id()) or 0)
    return loaded > identity_service.resolved_up_to(context.warehouse)


class _SnapshotCursor:
    """Where the rolling republication of the member snapshot stands: the last membership
    id of the slice published last ("" to start from the first)."""

    def __init__(self) -> None:
        self.after = ""


# One per warehouse, like the rows due.
_cursors: PerObject[Warehouse, _SnapshotCursor] = PerObject(lambda _: _SnapshotCursor())


def publish_snapshot(context: JobContext) -> int:
    """Republish the next slice of the warehouse member snapshot the segment fields
    `loyalty.*` read: a `SNAPSHOT_SLICES`th of the memberships by id per run, so each row is
    rewritten at least once every `SNAPSHOT_SLICES` runs (what time alone changes: pending
    points becoming spendable, expiries), without the whole rewrite's burst."""
    cursor = _cursors(context.warehouse)
    with context.db.begin() as session:
        members = int(session.scalar(select(func.count()).select_from(Member)) or 0)
        rows, through = service.publish_member_snapshot_slice(
            session,
            context.warehouse,
            after=cursor.after,
            limit=max(SNAPSHOT_MIN_SLICE, -(-members // SNAPSHOT_SLICES)),
        )
    cursor.after = through or ""
    context.message = f"{rows} memberships published" + ("" if through else " (last slice)")
    return rows


def expire_points(context: JobContext) -> int:
    """Expire the points past their expiry in every programme that ever ran: a paused or
    ended programme's points still expire on their dates (breakage and liability stay
    true); a draft has none."""
    expired = 0
    now = utcnow()
    with context.db.begin() as session:
        programs = list(session.scalars(select(Program.id).where(Program.status != "draft")))
    for program_id in programs:
        with context.db.begin() as session:
            due = service.due_lots(session, program_id=program_id, now=now)
        # One transaction per chunk: the write lock is released between them, so real time
        # keeps committing while a large expiry runs (2M lots due at once held it for
        # minutes in one transaction).
        for lot_ids in ledger.in_chunks(due, ledger.EXPIRY_CHUNK):
            with context.db.begin() as session:
                expired += service.expire_lots(
                    session, program_id=program_id, lot_ids=lot_ids, now=now
                )
    return expired


def award_birthdays(context: JobContext) -> int:
    """Birthday bonuses of the members whose birthday it is in their programme's time zone."""
    credits = 0
    for program_id in _active_programs(context):
        with context.db.begin() as session:
            credits += service.award_birthdays(
                session, context.warehouse, program_id=program_id
            ).credits
    context.message = f"{credits} birthday credits"
    return credits


def reevaluate_tiers(context: JobContext) -> int:
    """Re-evaluate tiers (downgrades after grace) in every active programme."""
    moved = 0
    for program_id in _active_programs(context):
        with context.db.begin() as session:
            moved += len(service.reevaluate_tiers(session, program_id=program_id))
    return moved


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        "loyalty.apply_merges",
        apply_merges,
        "apply identity's merges, splits and erasures to memberships and ledgers",
        trigger="interval",
        trigger_args={"seconds": 30},
    ),
    JobSpec(
        "loyalty.process_events",
        process_new_events,
        "resolve and award points for newly loaded events (real time)",
        trigger="interval",
        trigger_args={"seconds": 1},
    ),
    JobSpec(
        "loyalty.publish_snapshot",
        publish_snapshot,
        "publish the member snapshot (tier, balance, enrolment) for segment rules, a slice"
        " of the memberships per run",
        trigger="interval",
        trigger_args={"seconds": SNAPSHOT_SLICE_SECONDS},
    ),
    JobSpec(
        "loyalty.expire_points",
        expire_points,
        "expire points past their expiry date",
        trigger="cron",
        trigger_args={"hour": 2, "minute": 0},
    ),
    JobSpec(
        "loyalty.birthday_bonus",
        award_birthdays,
        "award birthday bonuses (hourly, so each programme's local day is caught early)",
        trigger="cron",
        trigger_args={"minute": 7},
    ),
    JobSpec(
        "loyalty.reevaluate_tiers",
        reevaluate_tiers,
        "re-evaluate member tiers (downgrades after the grace period)",
        trigger="cron",
        trigger_args={"hour": 3, "minute": 0},
    ),
)
