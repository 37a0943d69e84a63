"""Fixtures of the dashboards tests: a tiny warehouse with known counts, keys, job runs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from cdp.auth import Role
from cdp.db import Database
from cdp.scheduler import JobRun
from cdp.warehouse import Warehouse
from tests.conftest import make_key

_TODAY = datetime.now(UTC).date()
DAY = _TODAY - timedelta(days=_TODAY.weekday() + 21)  # the Monday three weeks ago


def at(day: date, hour: int = 12) -> datetime:
    """A naive UTC timestamp on `day` (warehouse convention)."""
    return datetime.combine(day, datetime.min.time()) + timedelta(hours=hour)


def load_events(warehouse: Warehouse, rows: list[tuple[str, str, datetime, list[str]]]) -> None:
    """Insert events `(source_id, type, received_at, identifier kinds)`, ids in order."""
    events = pl.DataFrame(
        {
            "event_id": list(range(1, len(rows) + 1)),
            "message_id": [f"m{i}" for i in range(1, len(rows) + 1)],
            "source_id": [r[0] for r in rows],
            "batch_id": [1] * len(rows),
            "type": [r[1] for r in rows],
            "event": [None] * len(rows),
            "user_id": [None] * len(rows),
            "anonymous_id": [None] * len(rows),
            "timestamp": [r[2] for r in rows],
            "received_at": [r[2] for r in rows],
            "properties": [None] * len(rows),
            "traits": [None] * len(rows),
            "context": [None] * len(rows),
        },
        schema_overrides={
            "event": pl.String,
            "user_id": pl.String,
            "anonymous_id": pl.String,
            "properties": pl.String,
            "traits": pl.String,
            "context": pl.String,
        },
    )
    identifiers = pl.DataFrame(
        {
            "event_id": [i for i, r in enumerate(rows, 1) for _ in r[3]],
            "kind": [k for r in rows for k in r[3]],
            "value": [f"{k}-{i}" for i, r in enumerate(rows, 1) for k in r[3]],
        },
        schema={"event_id": pl.Int64, "kind": pl.String, "value": pl.String},
    )
    with warehouse.transaction() as cur:
        for statement, frame in (
            ("INSERT INTO events SELECT * FROM staged", events),
            ("INSERT INTO event_identifiers SELECT * FROM staged", identifiers),
        ):
            cur.register("staged", frame.to_arrow())
            cur.execute(statement)
            cur.unregister("staged")


def load_batches(warehouse: Warehouse, rows: list[tuple[str, str, datetime]]) -> None:
    """Insert load batches `(source_id, channel, committed_at)`."""
    frame = pl.DataFrame(
        {
            "batch_id": list(range(1, len(rows) + 1)),
            "source_id": [r[0] for r in rows],
            "channel": [r[1] for r in rows],
            "first_event_id": [1] * len(rows),
            "last_event_id": [1] * len(rows),
            "events": [1] * len(rows),
            "committed_at": [r[2] for r in rows],
        }
    )
    with warehouse.transaction() as cur:
        cur.register("staged", frame.to_arrow())
        cur.execute("INSERT INTO ingest_batches SELECT * FROM staged")
        cur.unregister("staged")


def load_job_runs(db: Database, rows: list[tuple[str, str, datetime]]) -> None:
    """Record job runs `(job, status, started_at aware UTC)`."""
    with db.begin() as session:
        for job, status, started in rows:
            session.add(JobRun(job=job, trigger="schedule", status=status, started_at=started))


@pytest.fixture
def seeded(warehouse: Warehouse) -> Warehouse:
    """Events over three days of one week and the next Monday, with identifiers and batches."""
    day2, day3, next_week = DAY + timedelta(days=1), DAY + timedelta(days=2), DAY + timedelta(7)
    load_events(
        warehouse,
        [
            ("web", "track", at(DAY, 1), ["anonymous_id", "email"]),
            ("web", "page", at(DAY, 23), ["anonymous_id"]),
            ("pos", "track", at(DAY, 10), ["user_id", "email", "phone"]),
            ("web", "track", at(day2), ["anonymous_id"]),
            ("app", "identify", at(day3), ["user_id", "email"]),
            ("app", "track", at(next_week, 0), []),
        ],
    )
    load_batches(
        warehouse,
        [("web", "http", at(DAY)), ("pos", "file", at(DAY, 13)), ("app", "http", at(day3))],
    )
    return warehouse


@pytest.fixture
def viewer_key(db: Database) -> str:
    """A viewer API key."""
    return make_key(db, Role.viewer)


@pytest.fixture
def viewer_headers(viewer_key: str) -> dict[str, str]:
    """Authorization headers of a viewer key."""
    return {"Authorization": f"Bearer {viewer_key}"}


def aware(day: date, hour: int = 12) -> datetime:
    """An aware UTC timestamp on `day` (operational convention)."""
    return at(day, hour).replace(tzinfo=UTC)
