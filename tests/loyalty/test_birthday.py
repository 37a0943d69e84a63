"""Birthday bonus: once per member per year, on the local birthday, 29 February included."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRunner
from cdp.warehouse import Warehouse
from loyalty import jobs, service
from loyalty.models import LedgerEntry, Member, Program
from loyalty.schemas import RuleCreate, RuleUpdate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import make_member, make_program
from tests.loyalty.identity_data import profile_of, resolve, write_events

PEOPLE = {
    "ann": "1990-06-15",
    "bob": "1992-06-14",
    "cara": "2000-02-29",
    "dan": None,
    "eve": "1985-06-15",  # not a member
}


def _setup(db: Database, warehouse: Warehouse) -> tuple[Program, str, dict[str, str]]:
    write_events(
        warehouse,
        [([("user_id", name)], "Signed Up", 0) for name in PEOPLE],
        traits=[{"birth_date": born} if born else {"first_name": n} for n, born in PEOPLE.items()],
    )
    resolve(warehouse)
    program = make_program(db, timezone="Europe/Paris")
    with db.begin() as session:
        rule = service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="birthday", event_name="Birthday", formula={"type": "fixed", "points": 100}
            ),
        )
    members = {}
    for name in ("ann", "bob", "cara", "dan"):
        members[name] = make_member(db, program, profile_of(warehouse, "user_id", name)).id
    return program, rule.id, members


def _award(db: Database, warehouse: Warehouse, program: Program, at: datetime) -> int:
    with db.begin() as session:
        return service.award_birthdays(session, warehouse, program_id=program.id, now=at).credits


def _bonuses(db: Database, program: Program) -> list[tuple[str, datetime, int, str]]:
    with db.begin() as session:
        rows = session.execute(
            select(
                Member.profile_id,
                LedgerEntry.occurred_at,
                LedgerEntry.points,
                LedgerEntry.idempotency_key,
            )
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(LedgerEntry.program_id == program.id)
            .order_by(LedgerEntry.occurred_at, Member.profile_id)
        ).all()
    return [(str(p), at, int(x), str(k)) for p, at, x, k in rows]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_birthday_bonus_follows_the_programme_day_and_is_awarded_once_a_year(
    db: Database, warehouse: Warehouse
) -> None:
    program, rule_id, members = _setup(db, warehouse)
    names = {profile_of(warehouse, "user_id", n): n for n in PEOPLE}
    # 21:30 UTC on 14 June is 23:30 in Paris: still Bob's day, not yet Ann's.
    assert _award(db, warehouse, program, datetime(2026, 6, 14, 21, 30, tzinfo=UTC)) == 1
    # 22:30 UTC on 14 June is 00:30 on 15 June in Paris: Ann's birthday (not Eve's: no member).
    assert _award(db, warehouse, program, datetime(2026, 6, 14, 22, 30, tzinfo=UTC)) == 1
    # Later the same day and again later that year: nothing twice.
    assert _award(db, warehouse, program, datetime(2026, 6, 15, 12, 0, tzinfo=UTC)) == 0
    bonuses = _bonuses(db, program)
    assert [(names[p], at, x) for p, at, x, _ in bonuses] == [
        ("bob", datetime(2026, 6, 13, 22, 0, tzinfo=UTC), 100),
        ("ann", datetime(2026, 6, 14, 22, 0, tzinfo=UTC), 100),
    ]
    assert bonuses[1][3] == f"event:birthday:{members['ann']}:2026:rule:{rule_id}"
    # Next year: once more.
    assert _award(db, warehouse, program, datetime(2027, 6, 15, 8, 0, tzinfo=UTC)) == 1
    with db.begin() as session:
        view = service.member_balance(session, member_id=members["ann"])[1]
    assert view.active == 200


def test_29_february_birthdays_fall_on_1_march_in_common_years(
    db: Database, warehouse: Warehouse
) -> None:
    program, _, members = _setup(db, warehouse)
    cara = profile_of(warehouse, "user_id", "cara")
    for at, credits in (
        (datetime(2027, 2, 28, 12, tzinfo=UTC), 0),
        (datetime(2027, 3, 1, 12, tzinfo=UTC), 1),  # 2027 has no 29 February
        (datetime(2028, 2, 29, 12, tzinfo=UTC), 1),  # 2028 has one
        (datetime(2028, 3, 1, 12, tzinfo=UTC), 0),
    ):
        assert _award(db, warehouse, program, at) == credits, at
    assert [(p, at.date().isoformat()) for p, at, _, _ in _bonuses(db, program)] == [
        (cara, "2027-02-28"),  # local midnight of 1 March in Paris, in UTC
        (cara, "2028-02-28"),
    ]
    with db.begin() as session:
        assert service.member_balance(session, member_id=members["cara"])[1].active == 200


def test_birthday_rules_are_conditional_and_ignored_by_event_processing(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    program, rule_id, _ = _setup(db, warehouse)
    with db.begin() as session:
        service.update_rule(
            session,
            rule_id=rule_id,
            data=RuleUpdate(condition={"field": "traits.country", "op": "eq", "value": "FR"}),
        )
    # The condition reads the profile's traits: Ann has no country, so no bonus.
    assert _award(db, warehouse, program, datetime(2026, 6, 15, 9, tzinfo=UTC)) == 0
    write_events(
        warehouse,
        [([("user_id", "ann")], "Profile Updated", 0)],
        traits=[{"birth_date": "1990-06-15", "country": "FR"}],
    )
    resolve(warehouse)
    assert _award(db, warehouse, program, datetime(2026, 6, 15, 10, tzinfo=UTC)) == 1
    # A tracked `Birthday` event earns nothing: only the job gives the bonus.
    write_events(warehouse, [([("user_id", "bob")], "Birthday", 0)])
    resolve(warehouse)
    with db.begin() as session:
        result, _ = service.sync_program(session, warehouse, program_id=program.id)
    assert result.credits == 0
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    run = runner.run("loyalty.birthday_bonus", trigger="manual")
    assert run.status == "succeeded"
    runner.shutdown()
