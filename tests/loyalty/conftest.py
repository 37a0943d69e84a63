"""Fixtures of the loyalty tests: keys, a programme and members."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from cdp.auth import Role
from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRun, JobRunner
from cdp.warehouse import Warehouse
from loyalty import jobs, service
from loyalty.ledger import Credit, credit
from loyalty.models import LedgerEntry, Member, Program
from loyalty.schemas import ProgramCreate, RuleCreate
from tests.conftest import make_key
from tests.loyalty.identity_data import profile_of, resolve, write_events

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
def loyalty_headers(db: Database) -> dict[str, str]:
    """Authorization headers of a `loyalty` key."""
    return {"Authorization": f"Bearer {make_key(db, Role.loyalty)}"}


Profiles = Callable[..., dict[str, str]]


@pytest.fixture
def profiles(warehouse: Warehouse) -> Profiles:
    """Issue real profiles through identity, as the API's enrolment needs: `profiles("ann",
    "bob")` writes one event per name (its `user_id`), resolves, and maps name -> profile id."""

    def issue(*names: str) -> dict[str, str]:
        write_events(warehouse, [([("user_id", name)], None, 0.0) for name in names])
        resolve(warehouse)
        return {name: profile_of(warehouse, "user_id", name) for name in names}

    return issue


def make_program(db: Database, **overrides: Any) -> Program:  # Any: programme fields
    """Create an active programme (UTC, no pending period, no expiry unless overridden)."""
    fields: dict[str, Any] = {"name": "Club", "status": "active", **overrides}  # Any: fields
    with db.begin() as session:
        return service.create_program(session, data=ProgramCreate(**fields))


def add_base_rule(session: Session, program: Program) -> None:
    """The plain earning rule many tests start from: 1 point per unit spent on orders."""
    service.create_rule(
        session,
        program_id=program.id,
        data=RuleCreate(name="base", event_name="Order Completed", formula={"type": "per_amount"}),
    )


def make_member(db: Database, program: Program, profile_id: str = "p1") -> Member:
    """Enrol a profile."""
    with db.begin() as session:
        return service.change_membership(
            session, program_id=program.id, profile_id=profile_id, action="enrol", at=T0
        )


def earn(
    db: Database,
    program: Program,
    member: Member,
    points: int,
    *,
    at: datetime = T0,
    key: str | None = None,
    order_id: str | None = None,
    now: datetime | None = None,
) -> LedgerEntry:
    """Credit earned points to a member."""
    with db.begin() as session:
        return credit(
            session,
            program=session.get(Program, program.id) or program,
            credit=Credit(
                member_id=member.id,
                kind="earn",
                points=points,
                qualifying_points=points,
                occurred_at=at,
                idempotency_key=key or f"test:{member.id}:{at.isoformat()}:{points}:{order_id}",
                order_id=order_id,
            ),
            now=now or at,
        )


def run_job(settings: Settings, db: Database, warehouse: Warehouse, name: str) -> JobRun:
    """Run one of the loyalty jobs once, as `cdp jobs run NAME` does."""
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    try:
        return runner.run(name, trigger="manual")
    finally:
        runner.shutdown()
