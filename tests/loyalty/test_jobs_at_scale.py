"""The scheduled jobs and member reads of a programme with more members than a statement can
bind (SQLite: 32,766 variables; PostgreSQL: 65,535): every job runs and does exactly its work."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from sqlalchemy import event, insert, select
from sqlalchemy.orm import Session

from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from loyalty import ledger, service, tiers
from loyalty.models import LedgerEntry, Lot, Member, TierChange
from loyalty.schemas import ProgramCreate, RewardCreate, RuleCreate, TierCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, earn, make_member, make_program

MEMBERS = 70_000  # above both backends' bound-parameter limits
# SQLite's stock limit since 3.32 (Python's own builds); Debian's library allows 250,000.
SQLITE_MAX_VARIABLES = 32_766
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)

# Member index ranges of each case (every other member is active, without tier or points).
UP_GOLD = range(0, 40)  # 600 qualifying points, no tier: upgraded to Gold
UP_SILVER = range(40, 80)  # 150 points, no tier: upgraded to Silver
DOWN_NONE = range(80, 120)  # Gold, nothing in the window, below for 40 days: to no tier
DOWN_SILVER = range(120, 160)  # Gold, 200 points, below for 40 days: to Silver
NEWLY_BELOW = range(160, 200)  # Gold, 120 points, not yet below: below from now, kept
RECOVERED = range(200, 240)  # Silver, 150 points, marked below: no longer below
HELD = range(240, 260)  # Gold imported 100 days ago, nothing here: held
OUT_OF_WINDOW = range(260, 280)  # Silver, 300 points 400 days ago (expired lots): to no tier
UNENROLLED = range(280, 300)  # 600 points (an expired lot), unenrolled: never moved
PAIRS = range(300, 340)  # even: survivor with 200 points; odd: merged into it, 400 points
EXPIRING = range(340, 400)  # 50 points expiring in 5 days: to remind
BIRTHDAYS = range(400, 450)  # born on 15 June: 25 points each today
OTHER_DAY = range(450, 500)  # born on 16 June: nothing today


def _mid(i: int) -> str:
    return f"m{i:06d}"


def _pid(i: int) -> str:
    return f"p{i:06d}"


def _stock_sqlite_limit(db: Database) -> None:
    """Give every SQLite connection the stock limit of bound variables, whatever the build."""
    if db.engine.dialect.name != "sqlite":
        return

    @event.listens_for(db.engine, "connect")
    def _limit(connection: sqlite3.Connection, _record: object) -> None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_MAX_VARIABLES)

    db.engine.dispose()


def _build(db: Database, warehouse: Warehouse) -> tuple[str, str, str]:
    """The programme, its ladder and its members, written in bulk as an import would."""
    with db.begin() as session:
        program = service.create_program(
            session,
            data=ProgramCreate(
                name="Big club",
                status="active",
                tier_grace_days=30,
                expiry_policy="rolling",
                expiry_months=12,
            ),
        )
        silver = service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Silver", rank=1, threshold=100)
        ).id
        gold = service.create_tier(
            session, program_id=program.id, data=TierCreate(name="Gold", rank=2, threshold=500)
        ).id
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="birthday",
                event_name="Birthday",
                formula={"type": "fixed", "points": 25},
                apply_tier_multiplier=False,
            ),
        )
        tier_of = {
            **dict.fromkeys([*DOWN_NONE, *DOWN_SILVER, *NEWLY_BELOW, *HELD], gold),
            **dict.fromkeys([*RECOVERED, *OUT_OF_WINDOW], silver),
        }
        below = {i: NOW - 40 * DAY for i in [*DOWN_NONE, *DOWN_SILVER]}
        below |= {i: NOW - 10 * DAY for i in RECOVERED}
        below |= {i: NOW - 31 * DAY for i in OUT_OF_WINDOW}
        rows = [
            {
                "id": _mid(i),
                "program_id": program.id,
                "profile_id": _pid(i),
                "status": "unenrolled"
                if i in UNENROLLED
                else ("merged" if i in PAIRS and i % 2 else "active"),
                "enrolled_at": NOW - 500 * DAY + (i % 1000) * timedelta(hours=6),
                "status_changed_at": NOW - 500 * DAY,
                "tier_id": tier_of.get(i),
                "tier_since": NOW - 200 * DAY if i in tier_of else None,
                "below_tier_since": below.get(i),
                "merged_into": _mid(i - 1) if i in PAIRS and i % 2 else None,
                "lock_seq": 0,
            }
            for i in range(MEMBERS)
        ]
        session.execute(insert(Member), rows)
        _credit(session, program.id, _credits())
        session.execute(
            insert(TierChange),
            [
                {
                    "id": f"import-{i}",
                    "program_id": program.id,
                    "member_id": _mid(i),
                    "from_tier_id": None,
                    "to_tier_id": gold,
                    "reason": tiers.IMPORT_REASON,
                    "metric_value": 0.0,
                    "at": NOW - 100 * DAY,
                    "recorded_at": NOW - 100 * DAY,
                }
                for i in HELD
            ],
        )
        program_id = program.id
    born = {**dict.fromkeys(BIRTHDAYS, "1990-06-15"), **dict.fromkeys(OTHER_DAY, "1991-06-16")}
    born[UNENROLLED[0]] = "1980-06-15"
    profiles = pl.DataFrame(
        {
            "profile_id": [_pid(i) for i in born],
            "created_at": [NOW.replace(tzinfo=None)] * len(born),
            "updated_at": [NOW.replace(tzinfo=None)] * len(born),
            "event_count": [0] * len(born),
            "identifiers": ["[]"] * len(born),
            "traits": [f'{{"birth_date": "{b}"}}' for b in born.values()],
        }
    )
    with warehouse.transaction() as cur:
        cur.register("profile_frame", profiles)
        cur.execute("INSERT INTO profiles BY NAME SELECT * FROM profile_frame")
        cur.unregister("profile_frame")
    return program_id, silver, gold


def _credit(
    session: Session, program_id: str, credits: list[tuple[int, int, datetime, datetime]]
) -> None:
    entries: list[dict[str, Any]] = []  # Any: column values
    lots: list[dict[str, Any]] = []  # Any: column values
    for n, (i, points, at, expires_at) in enumerate(credits):
        entry_id = f"e{n:06d}"
        entries.append(
            {
                "id": entry_id,
                "program_id": program_id,
                "member_id": _mid(i),
                "kind": "earn",
                "points": points,
                "qualifying_points": points,
                "unrecovered": 0,
                "status": "active",
                "expires_at": expires_at,
                "occurred_at": at,
                "local_date": at.date(),
                "created_at": at,
                "idempotency_key": f"seed:{entry_id}",
            }
        )
        # A merge moves the absorbed membership's lots to its survivor.
        owner = i - 1 if i in PAIRS and i % 2 else i
        lots.append(
            {
                "entry_id": entry_id,
                "program_id": program_id,
                "member_id": _mid(owner),
                "points": points,
                "remaining": points,
                "earned_at": at,
                "expires_at": expires_at,
            }
        )
    session.execute(insert(LedgerEntry), entries)
    session.execute(insert(Lot), lots)


def _ids(*ranges: range, step: int = 1) -> list[str]:
    return sorted(_mid(i) for r in ranges for i in r[::step])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_every_daily_job_does_its_work_for_a_programme_of_70000_members(
    db: Database, warehouse: Warehouse
) -> None:
    _stock_sqlite_limit(db)
    program_id, silver, gold = _build(db, warehouse)

    # 02:00: expiry, in every lot past its date (the unenrolled members' points too).
    with db.begin() as session:
        assert service.expire_points(session, program_id=program_id, now=NOW) == 40
        expired = session.execute(
            select(LedgerEntry.member_id, LedgerEntry.points, LedgerEntry.occurred_at)
            .where(LedgerEntry.program_id == program_id, LedgerEntry.kind == "expire")
            .order_by(LedgerEntry.member_id)
        ).all()
        assert [(m, p) for m, p, _ in expired] == [
            (_mid(i), -300 if i in OUT_OF_WINDOW else -600) for i in [*OUT_OF_WINDOW, *UNENROLLED]
        ]
        assert {at for *_, at in expired} == {NOW - 35 * DAY, NOW - 2 * DAY}
        assert service.expire_points(session, program_id=program_id, now=NOW) == 0

    # 03:00: upgrades, and downgrades past the grace period.
    with db.begin() as session:
        moves = service.reevaluate_tiers(session, program_id=program_id, now=NOW)
    by_reason: dict[tuple[str, str | None], list[str]] = {}
    for move in moves:
        by_reason.setdefault((move.reason, move.to_tier_id), []).append(move.member_id)
    assert {k: sorted(v) for k, v in by_reason.items()} == {
        ("upgrade", gold): _ids(UP_GOLD, PAIRS[::2]),
        ("upgrade", silver): _ids(UP_SILVER),
        ("downgrade", None): _ids(DOWN_NONE, OUT_OF_WINDOW),
        ("downgrade", silver): _ids(DOWN_SILVER),
    }
    values = {move.member_id: move.value for move in moves}
    assert {values[m] for m in _ids(DOWN_NONE, OUT_OF_WINDOW)} == {0.0}
    assert {values[m] for m in _ids(DOWN_SILVER)} == {200.0}
    assert {values[m] for m in _ids(PAIRS[::2])} == {600.0}
    with db.begin() as session:
        members = {
            m.id: (m.tier_id, m.below_tier_since)
            for m in session.scalars(select(Member).where(Member.id.in_(_ids(range(500)))))
        }
        changes = session.execute(
            select(TierChange.member_id, TierChange.reason, TierChange.recorded_at)
            .where(TierChange.program_id == program_id, TierChange.reason != tiers.IMPORT_REASON)
            .order_by(TierChange.recorded_at)
        ).all()
    expected_tier = {
        **dict.fromkeys([*UP_GOLD, *NEWLY_BELOW, *HELD, *PAIRS[::2]], gold),
        **dict.fromkeys([*UP_SILVER, *DOWN_SILVER, *RECOVERED], silver),
    }
    below = {i: NOW for i in NEWLY_BELOW}
    for i in range(500):
        if i in PAIRS and i % 2:
            continue
        assert members[_mid(i)] == (expected_tier.get(i), below.get(i)), i
    assert len(changes) == len(moves) == 200
    stamps = [at for *_, at in changes]
    assert len(set(stamps)) == len(stamps), "each change of the feed has its own stamp"
    with db.begin() as session:
        assert service.reevaluate_tiers(session, program_id=program_id, now=NOW + DAY) == []

    # Hourly: the birthday bonus of the active members born on the programme's day.
    with db.begin() as session:
        result = service.award_birthdays(session, warehouse, program_id=program_id, now=NOW)
        assert result.credits == len(BIRTHDAYS)
        birthday = session.execute(
            select(LedgerEntry.member_id, LedgerEntry.points).where(
                LedgerEntry.program_id == program_id, LedgerEntry.idempotency_key.like("event:%")
            )
        ).all()
        assert sorted(birthday) == [(m, 25) for m in _ids(BIRTHDAYS)]

    # Every 5 minutes: the member snapshot the segment fields read.
    with db.begin() as session:
        assert service.publish_member_snapshot(session, warehouse, now=NOW) == MEMBERS - 20
    snapshot = warehouse.run(
        Query(
            "SELECT member_id, tier, balance, enrolled FROM loyalty_member_snapshot "
            "WHERE member_id IN (SELECT unnest($ids))",
            {"ids": [_mid(i) for i in (0, 40, 80, 260, 280, 300, 340, 400, 999)]},
        )
    ).sort("member_id")
    assert snapshot.rows() == [
        (_mid(0), "Gold", 600, True),
        (_mid(40), "Silver", 150, True),
        (_mid(80), None, 0, True),
        (_mid(260), None, 0, True),
        (_mid(280), None, 0, False),
        (_mid(300), "Gold", 600, True),  # its lots and the merged membership's
        (_mid(340), None, 50, True),
        (_mid(400), None, 25, True),
        (_mid(999), None, 0, True),
    ]

    # Reminders: the active members with points expiring within 30 days.
    with db.begin() as session:
        soon = service.expiring_soon(session, program_id=program_id, days=30, now=NOW)
    assert [(m, p, n, at) for m, p, n, at in soon] == [
        (_mid(i), _pid(i), 50, NOW + 5 * DAY) for i in EXPIRING
    ]

    # KPIs.
    with db.begin() as session:
        k = service.kpis(session, warehouse, program_id=program_id, now=NOW)
    assert k.members == MEMBERS - 20
    assert k.points_expired == 20 * 300 + 20 * 600
    issued = sum(p for _, p, _, _ in _credits()) + 25 * len(BIRTHDAYS)
    assert k.points_issued == issued
    assert k.points_outstanding == issued - k.points_expired
    active = MEMBERS - 40
    assert k.tier_distribution == {"Gold": 120, "Silver": 120, "none": active - 240}
    assert k.tier_movements_30d == {"upgrade": 100, "downgrade": 100}
    assert sum(c.count for c in k.enrolment_by_month) == MEMBERS - 20
    first = (NOW - 500 * DAY).date()
    assert k.enrolment_by_month[0].period == first.strftime("%Y-%m")

    # Member reads: a survivor's balance, history and tier progress include the merged one.
    with db.begin() as session:
        balance = service.balance_read(session, member_id=_mid(300))
        assert (balance.active, balance.qualifying_points) == (600, 600)
        assert balance.tier is not None
        assert (balance.tier.tier_name, balance.tier.value) == ("Gold", 600)
        page, total = service.history(session, member_id=_mid(300), limit=10, offset=0)
        assert total == 2
        assert sorted(e.points for e in page) == [200, 400]
        progress = service.tier_progress(session, member_id=_mid(160), now=NOW)
        assert progress is not None
        assert (progress.tier_name, progress.value, progress.missing) == ("Gold", 120, None)


def _credits() -> list[tuple[int, int, datetime, datetime]]:
    """(member, points, earned at, expiry) of each credit `_build` writes."""
    credits = [(i, 600, NOW - 10 * DAY, NOW + 300 * DAY) for i in UP_GOLD]
    credits += [(i, 150, NOW - 10 * DAY, NOW + 300 * DAY) for i in UP_SILVER]
    credits += [(i, 200, NOW - 100 * DAY, NOW + 200 * DAY) for i in DOWN_SILVER]
    credits += [(i, 120, NOW - 100 * DAY, NOW + 200 * DAY) for i in NEWLY_BELOW]
    credits += [(i, 150, NOW - 100 * DAY, NOW + 200 * DAY) for i in RECOVERED]
    credits += [(i, 300, NOW - 400 * DAY, NOW - 35 * DAY) for i in OUT_OF_WINDOW]
    credits += [(i, 600, NOW - 100 * DAY, NOW - 2 * DAY) for i in UNENROLLED]
    credits += [(i, 400 if i % 2 else 200, NOW - 50 * DAY, NOW + 250 * DAY) for i in PAIRS]
    credits += [(i, 50, NOW - 360 * DAY, NOW + 5 * DAY) for i in EXPIRING]
    return credits


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_lot_given_back_what_an_earlier_expiry_saw_drawn_still_expires(db: Database) -> None:
    """Two redemptions of 30 from a lot of 100, expiry (40), one cancelled, expiry (30), the
    other cancelled: the lot has drawn 70 again, as at the second expiry, whose key
    `expire:<lot>:70` is taken. Before, `expire_points` never returned."""
    program = make_program(db, expiry_policy="rolling", expiry_months=1)
    member = make_member(db, program)
    lot = earn(db, program, member, 100, at=T0, key="lot").id
    with db.begin() as session:
        reward = service.create_reward(
            session, program_id=program.id, data=RewardCreate(name="x", points_cost=30)
        )
        first, second = (
            service.redeem(session, member_id=member.id, reward_id=reward.id, now=T0)
            for _ in range(2)
        )
    later = T0 + timedelta(days=40)
    for redemption in (first, second):
        with db.begin() as session:
            assert service.expire_points(session, program_id=program.id, now=later) == 1
        with db.begin() as session:
            service.cancel_redemption(
                session, redemption_id=redemption.id, reason="returned", now=later
            )
    with db.begin() as session:
        assert service.expire_points(session, program_id=program.id, now=later) == 1
        assert service.expire_points(session, program_id=program.id, now=later) == 0
        expiries = session.execute(
            select(LedgerEntry.idempotency_key, LedgerEntry.points)
            .where(LedgerEntry.kind == "expire")
            .order_by(LedgerEntry.points)
        ).all()
        assert sorted(expiries) == [
            (f"expire:{lot}:60", -40),
            (f"expire:{lot}:70", -30),
            (f"expire:{lot}:70:6", -30),  # its draws: 2 redemptions, 2 expiries, 2 cancels
        ]
        assert ledger.lots_sum(session, member_id=member.id) == 0
        assert ledger.entries_sum(session, member_id=member.id) == 0
