"""Day boundaries follow the programme's time zone, across daylight-saving changes."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from cdp.db import Database
from loyalty import calendar, ledger
from loyalty.errors import InvalidProgram
from tests.loyalty.conftest import earn, make_member, make_program

PARIS = "Europe/Paris"


def test_local_day_of_an_instant_around_the_autumn_dst_change() -> None:
    # 25 October 2026: Paris goes from UTC+2 to UTC+1 at 03:00 local.
    assert calendar.local_date(datetime(2026, 10, 24, 21, 59, tzinfo=UTC), PARIS) == date(
        2026, 10, 24
    )
    assert calendar.local_date(datetime(2026, 10, 24, 22, 0, tzinfo=UTC), PARIS) == date(
        2026, 10, 25
    )
    assert calendar.start_of_day(date(2026, 10, 25), PARIS) == datetime(
        2026, 10, 24, 22, tzinfo=UTC
    )
    assert calendar.start_of_day(date(2026, 10, 26), PARIS) == datetime(
        2026, 10, 25, 23, tzinfo=UTC
    )


def test_pending_end_and_expiry_fall_on_local_midnights_across_dst(db: Database) -> None:
    program = make_program(
        db, timezone=PARIS, pending_days=1, expiry_policy="rolling", expiry_months=1
    )
    member = make_member(db, program)
    before = earn(db, program, member, 10, at=datetime(2026, 10, 24, 21, 30, tzinfo=UTC))
    after = earn(db, program, member, 20, at=datetime(2026, 10, 24, 22, 30, tzinfo=UTC))
    # 23:30 summer time on the 24th: spendable from midnight on the 25th (still UTC+2).
    assert before.local_date == date(2026, 10, 24)
    assert before.pending_until == datetime(2026, 10, 24, 22, tzinfo=UTC)
    # 00:30 on the 25th: spendable from midnight on the 26th, now in winter time (UTC+1),
    # 25 hours later in UTC, not 24.
    assert after.local_date == date(2026, 10, 25)
    assert after.pending_until == datetime(2026, 10, 25, 23, tzinfo=UTC)
    # Valid through the same day a month later, until local midnight (winter time).
    assert before.expires_at == datetime(2026, 11, 24, 23, tzinfo=UTC)
    assert after.expires_at == datetime(2026, 11, 25, 23, tzinfo=UTC)
    with db.begin() as session:
        view = ledger.balance(
            session,
            program=program,
            member_id=member.id,
            now=datetime(2026, 10, 25, 22, 59, tzinfo=UTC),
        )
    assert (view.active, view.pending) == (10, 20)


def test_spring_dst_end_of_period_expiry_is_local_new_year() -> None:
    assert calendar.expires_at(date(2026, 3, 29), PARIS, "end_of_period", 12) == datetime(
        2026, 12, 31, 23, tzinfo=UTC
    )
    assert calendar.expires_at(date(2026, 5, 1), PARIS, "end_of_period", 3) == datetime(
        2026, 6, 30, 22, tzinfo=UTC
    )


def test_rolling_expiry_clamps_to_the_end_of_shorter_months() -> None:
    assert calendar.add_months(date(2026, 1, 31), 1) == date(2026, 2, 28)
    assert calendar.add_months(date(2024, 1, 31), 1) == date(2024, 2, 29)


def test_unknown_time_zone_is_rejected() -> None:
    with pytest.raises(InvalidProgram):
        calendar.zone("Mars/Olympus")
