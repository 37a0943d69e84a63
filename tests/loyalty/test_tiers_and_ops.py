"""Tiers (windows, grace), opening-balance import, expiry reminders and programme KPIs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import accumulate

from fastapi.testclient import TestClient
from sqlalchemy import select

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from loyalty import ledger, service
from loyalty.models import Activity, LedgerEntry, Lot, Member
from loyalty.schemas import ProgramUpdate, RewardCreate, RuleCreate, TierCreate
from tests.loyalty.conftest import T0, earn, make_member, make_program, run_job
from tests.loyalty.events import ev
from tests.loyalty.identity_data import profile_of, resolve, write_events
from tests.loyalty.test_backfill import _load_warehouse
from tests.loyalty.test_engine import _process

H = dict[str, str]


def _ladder(db: Database, program_id: str) -> tuple[str, str]:
    with db.begin() as session:
        silver = service.create_tier(
            session, program_id=program_id, data=TierCreate(name="Silver", rank=1, threshold=100)
        ).id
        gold = service.create_tier(
            session, program_id=program_id, data=TierCreate(name="Gold", rank=2, threshold=500)
        ).id
    return silver, gold


def test_downgrade_waits_for_the_grace_period_and_rolling_window(db: Database) -> None:
    program = make_program(db, tier_grace_days=30)
    member = make_member(db, program)
    silver, gold = _ladder(db, program.id)
    with db.begin() as session:
        service.adjust_points(
            session,
            member_id=member.id,
            points=600,
            reason="launch",
            actor="test",
            qualifying=True,
            now=T0,
        )
        assert service.get_member(session, member_id=member.id).tier_id == gold
    year_later = T0 + timedelta(days=366)
    with db.begin() as session:
        assert service.reevaluate_tiers(session, program_id=program.id, now=year_later) == []
        still = service.get_member(session, member_id=member.id)
        assert (still.tier_id, still.below_tier_since) == (gold, year_later)
    with db.begin() as session:
        moves = service.reevaluate_tiers(
            session, program_id=program.id, now=year_later + timedelta(days=30)
        )
        assert [(m.reason, m.to_tier_id) for m in moves] == [("downgrade", None)]
        progress = service.tier_progress(
            session, member_id=member.id, now=year_later + timedelta(days=30)
        )
        assert progress is not None
        assert (progress.value, progress.next_tier_id, progress.missing) == (0, silver, 100)


def test_calendar_year_window_restarts_on_local_new_year(db: Database) -> None:
    program = make_program(db, tier_window="calendar_year", timezone="Europe/Paris")
    member = make_member(db, program)
    _ladder(db, program.id)
    # Paris is UTC+1 in winter: 23:30Z is 00:30 on 1 January, 22:30Z still 31 December.
    earn(db, program, member, 150, at=datetime(2026, 12, 31, 23, 30, tzinfo=UTC))
    earn(db, program, member, 400, at=datetime(2026, 12, 31, 22, 30, tzinfo=UTC))
    with db.begin() as session:
        progress = service.tier_progress(
            session, member_id=member.id, now=datetime(2027, 1, 5, tzinfo=UTC)
        )
        assert progress is not None
        assert progress.value == 150
        assert progress.window_start == datetime(2026, 12, 31, 23, tzinfo=UTC)


def test_spend_metric_counts_orders_net_of_refunds(db: Database) -> None:
    program = make_program(db, tier_metric="spend", enrolment="automatic")
    silver, _ = _ladder(db, program.id)
    with db.begin() as session:
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="r", event_name="Order Completed", formula={"type": "fixed", "points": 1}
            ),
        )
    _process(db, program, [ev("a", T0, event_id=1, order_id="o", total=120)], now=T0)
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id="a")
        assert member.tier_id == silver
    _process(db, program, [ev("a", T0, "Order Refunded", 2, order_id="o", total=50)], now=T0)
    with db.begin() as session:
        progress = service.tier_progress(session, member_id=member.id, now=T0)
        assert progress is not None
        assert progress.value == 70


def test_orders_metric_takes_fully_refunded_orders_off(db: Database) -> None:
    refund = "Order Refunded"
    rows = [
        ev("a", T0, event_id=1, order_id="o1", total=50),
        ev("a", T0 + timedelta(hours=1), event_id=2, order_id="o2", total=30),
        # Partial: o1 still counts. Then the rest of o1, then too much of it: -1 once.
        ev("a", T0 + timedelta(hours=2), refund, 3, order_id="o1", total=10),
        ev("a", T0 + timedelta(hours=3), refund, 4, order_id="o1", total=40),
        ev("a", T0 + timedelta(hours=4), refund, 5, order_id="o1", total=5),
        # No amount: the whole order.
        ev("a", T0 + timedelta(hours=5), refund, 6, order_id="o2"),
        ev("a", T0 + timedelta(hours=6), event_id=7, order_id="o3", total=20),
    ]
    expected = [1, 2, 2, 1, 1, 0, 1]
    for one_by_one in (True, False):
        program = make_program(db, name=f"Club {one_by_one}", tier_metric="orders")
        member = make_member(db, program, "a")
        with db.begin() as session:
            service.create_rule(
                session,
                program_id=program.id,
                data=RuleCreate(
                    name="r", event_name="Order Completed", formula={"type": "fixed", "points": 1}
                ),
            )
            service.create_tier(
                session, program_id=program.id, data=TierCreate(name="Silver", rank=1, threshold=5)
            )
        batches = [[row] for row in rows] if one_by_one else [rows]
        for batch in batches:
            _process(db, program, batch, now=T0)
        with db.begin() as session:
            counted = session.scalars(
                select(Activity.orders)
                .where(Activity.member_id == member.id)
                .order_by(Activity.occurred_at)
            ).all()
            assert list(accumulate(counted)) == expected
            progress = service.tier_progress(
                session, member_id=member.id, now=T0 + timedelta(days=1)
            )
            assert progress is not None
            assert progress.value == 1


def _people(warehouse: Warehouse, cards: list[str]) -> list[str]:
    """One resolved profile per loyalty card (each also has the email `<card>@old.example`,
    stored normalised, as ingestion would)."""
    write_events(
        warehouse,
        [
            ([("loyalty_card", c), ("email", f"{c.lower()}@old.example")], "Signed Up", 0)
            for c in cards
        ],
    )
    resolve(warehouse)
    return [profile_of(warehouse, "loyalty_card", c) for c in cards]


def test_opening_balance_import_is_idempotent_and_reports_bad_rows(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db)
    _, gold = _ladder(db, program.id)
    p1, p2, p3, p4, p5 = _people(warehouse, ["C1", "C2", "C3", "C4", "C5"])
    csv = (
        "profile_id,identifier_kind,identifier,balance,expires_at,tier,enrolled_at\n"
        f"{p1},,,500,2027-06-30T22:00:00Z,Gold,\n"
        f"{p2},,,abc,,,\n"
        ",email, C3@OLD.example ,40,,,2024-05-01T00:00:00Z\n"
        ",,,10,,,\n"
        f"{p4},,,10,,Diamond,\n"
        "nobody,,,10,,,\n"
        ",email,nobody@old.example,10,,,\n"
        ",loyalty_card,C2,10,,,not-a-date\n"
        f"{p5},,,10,,,\n"
        ",loyalty_card,C5,20,,,\n"
        ",,C4,20,,,\n"
    ).encode()
    url = f"/api/loyalty/programs/{program.id}/imports"
    first = client.post(url, files={"file": ("old.csv", csv, "text/csv")}, headers=loyalty_headers)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["rows"], body["imported"], body["members_created"], body["tiers_set"]) == (
        11,
        2,
        2,
        1,
    )
    assert [(e["row"], e["message"]) for e in body["errors"]] == [
        (2, "balance is not a whole number >= 0"),
        (4, "profile_id (or identifier) is empty"),
        (5, "unknown tier"),
        (6, "no profile nobody"),
        (7, "no profile holds email nobody@old.example"),
        (8, "enrolled_at is not an ISO 8601 date-time"),
        (9, "the same profile is named by another row"),
        (10, "the same profile is named by another row"),
        (11, "identifier_kind is empty"),
    ]
    again = client.post(url, files={"file": ("old.csv", csv, "text/csv")}, headers=loyalty_headers)
    assert (again.json()["imported"], again.json()["already_imported"]) == (0, 2)
    with db.begin() as session:
        first_member = service.member_by_profile(session, program_id=program.id, profile_id=p1)
        assert first_member.tier_id == gold
        lot = session.scalars(select(Lot).where(Lot.member_id == first_member.id)).one()
        assert (lot.remaining, lot.pending_until, lot.expires_at) == (
            500,
            None,
            datetime(2027, 6, 30, 22, tzinfo=UTC),
        )
        # Found by its email as typed in the old system (normalised as identity does).
        third = service.member_by_profile(session, program_id=program.id, profile_id=p3)
        assert third.enrolled_at == datetime(2024, 5, 1, tzinfo=UTC)
        assert service.member_balance(session, member_id=third.id)[1].active == 40
        assert len(session.scalars(select(LedgerEntry)).all()) == 2
        # No member for a row that failed, nor for profiles nobody imported.
        assert {m.profile_id for m in session.scalars(select(Member))} == {p1, p3}


def test_opening_balance_import_takes_a_merged_away_profile_id_to_its_survivor(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db)
    write_events(warehouse, [([("email", "ann@old.example")], "Signed Up", 0)])
    write_events(warehouse, [([("anonymous_id", "cookie-1")], "Page Viewed", 0)])
    resolve(warehouse)
    older = profile_of(warehouse, "email", "ann@old.example")
    newer = profile_of(warehouse, "anonymous_id", "cookie-1")
    # She logs in on that browser: the older profile absorbs the newer one.
    write_events(
        warehouse, [([("email", "ann@old.example"), ("anonymous_id", "cookie-1")], "Login", 0)]
    )
    resolve(warehouse)
    assert profile_of(warehouse, "anonymous_id", "cookie-1") == older != newer
    csv = f"profile_id,balance\n{newer},70\n".encode()
    answer = client.post(
        f"/api/loyalty/programs/{program.id}/imports",
        files={"file": ("old.csv", csv, "text/csv")},
        headers=loyalty_headers,
    )
    assert answer.status_code == 200, answer.text
    assert (answer.json()["imported"], answer.json()["errors"]) == (1, [])
    with db.begin() as session:
        member = service.member_by_profile(session, program_id=program.id, profile_id=older)
        assert service.member_balance(session, member_id=member.id)[1].active == 70


def test_an_imported_tier_is_held_for_twelve_months_then_re_evaluated(
    db: Database, warehouse: Warehouse
) -> None:
    program = make_program(db)
    silver, gold = _ladder(db, program.id)
    (profile,) = _people(warehouse, ["G1"])
    now = datetime(2026, 3, 10, tzinfo=UTC)
    with db.begin() as session:
        result = service.import_opening_balances(
            session,
            warehouse,
            settings=Settings(),
            program_id=program.id,
            content=f"profile_id,balance,tier\n{profile},0,Gold\n".encode(),
            now=now,
        )
        assert (result.tiers_set, result.errors) == (1, [])
        member_id = service.member_by_profile(session, program_id=program.id, profile_id=profile).id
    # Nothing in this ledger qualifies the member (the old system's points are not here):
    # the nightly re-evaluation keeps the imported tier for 12 months, then steps it down.
    for days, expected in ((1, gold), (200, gold), (364, gold), (366, None)):
        with db.begin() as session:
            service.reevaluate_tiers(session, program_id=program.id, now=now + timedelta(days=days))
            assert session.get(Member, member_id).tier_id == expected, days  # type: ignore[union-attr]
    del silver


def test_expiring_soon_lists_members_to_remind(
    db: Database, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db, expiry_policy="rolling", expiry_months=1)
    member = make_member(db, program)
    gone = make_member(db, program, "p-gone")
    now = datetime.now(UTC)
    earn(db, program, member, 30, at=now - timedelta(days=20), key="soon")
    earn(db, program, member, 20, at=now - timedelta(days=1), key="later")
    earn(db, program, gone, 40, at=now - timedelta(days=20), key="gone-soon")
    # An opted-out member is not reminded (its points still expire).
    with db.begin() as session:
        service.change_membership(
            session, program_id=program.id, profile_id="p-gone", action="opt_out"
        )
    resp = client.get(
        f"/api/loyalty/programs/{program.id}/expiring?days=15", headers=loyalty_headers
    )
    assert resp.status_code == 200
    assert [(r["member_id"], r["points"]) for r in resp.json()["items"]] == [(member.id, 30)]
    assert resp.json()["total"] == 1


def test_the_expiring_list_is_paginated_soonest_first(
    db: Database, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db, expiry_policy="rolling", expiry_months=1)
    now = datetime.now(UTC)
    members = [make_member(db, program, f"p{i}") for i in range(5)]
    for i, member in enumerate(members):  # p0 earned first, so its points expire first
        earn(db, program, member, 10 + i, at=now - timedelta(days=25 - i), key=f"e{i}")
    url = f"/api/loyalty/programs/{program.id}/expiring"
    first = client.get(url, params={"limit": 2}, headers=loyalty_headers).json()
    assert (first["total"], first["next_offset"]) == (5, 2)
    assert [r["points"] for r in first["items"]] == [10, 11]
    rest = client.get(url, params={"limit": 2, "offset": 4}, headers=loyalty_headers).json()
    assert ([r["member_id"] for r in rest["items"]], rest["next_offset"]) == ([members[4].id], None)


def test_the_expiry_job_expires_points_of_paused_and_ended_programmes_too(
    db: Database, warehouse: Warehouse, settings: Settings
) -> None:
    past = datetime.now(UTC) - timedelta(days=70)
    ledgers = []
    for status in ("active", "paused", "ended"):
        program = make_program(db, name=status, expiry_policy="rolling", expiry_months=1)
        member = make_member(db, program)
        earn(db, program, member, 25, at=past, key=f"old-{status}")
        if status != "active":
            with db.begin() as session:
                service.update_program(
                    session, program_id=program.id, data=ProgramUpdate(status="paused")
                )
                if status == "ended":
                    service.update_program(
                        session, program_id=program.id, data=ProgramUpdate(status="ended")
                    )
        ledgers.append(member.id)
    run = run_job(settings, db, warehouse, "loyalty.expire_points")
    assert (run.status, run.rows) == ("succeeded", 3)
    with db.begin() as session:
        for member_id in ledgers:
            kinds = session.scalars(
                select(LedgerEntry.kind).where(LedgerEntry.member_id == member_id)
            ).all()
            assert sorted(kinds) == ["earn", "expire"], member_id


def test_an_end_of_period_expiry_must_tile_the_calendar_year(
    client: TestClient, loyalty_headers: H
) -> None:
    body = {"name": "Club", "expiry_policy": "end_of_period"}
    for months, expected in ((5, 422), (7, 422), (18, 422), (4, 201), (6, 201), (24, 201)):
        answer = client.post(
            "/api/loyalty/programs", json={**body, "expiry_months": months}, headers=loyalty_headers
        )
        assert answer.status_code == expected, (months, answer.text)
    made = client.post(
        "/api/loyalty/programs", json={**body, "expiry_months": 3}, headers=loyalty_headers
    ).json()
    changed = client.patch(
        f"/api/loyalty/programs/{made['id']}", json={"expiry_months": 5}, headers=loyalty_headers
    )
    assert changed.status_code == 422, changed.text
    assert "does not tile the calendar year" in changed.text


def test_kpis_sum_up_the_ledger_and_compare_members_with_non_members(
    db: Database, warehouse: Warehouse, client: TestClient, loyalty_headers: H
) -> None:
    program = make_program(db, expiry_policy="rolling", expiry_months=1, point_value=0.05)
    member = make_member(db, program, "m")
    now = datetime.now(UTC).replace(microsecond=0)
    earn(db, program, member, 100, at=now - timedelta(days=40), key="old", now=now)
    earn(db, program, member, 200, at=now - timedelta(days=2), key="new", now=now)
    with db.begin() as session:
        service.expire_points(session, program_id=program.id, now=now)
        reward = service.create_reward(
            session, program_id=program.id, data=RewardCreate(name="x", points_cost=50)
        )
        service.redeem(session, member_id=member.id, reward_id=reward.id, now=now)
        session.add(
            Activity(
                program_id=program.id,
                member_id=member.id,
                order_id="o1",
                spend=80.0,
                orders=1,
                occurred_at=now - timedelta(days=2),
                idempotency_key="a1",
            )
        )
    _load_warehouse(
        warehouse,
        [
            ev("m", now - timedelta(days=2), event_id=1, total=80),
            ev("x", now - timedelta(days=3), event_id=2, total=30),
            ev("x", now - timedelta(days=4), event_id=3, total=10),
            ev("y", now - timedelta(days=5), event_id=4, total=20),
        ],
    )
    resp = client.get(f"/api/loyalty/programs/{program.id}/kpis", headers=loyalty_headers)
    assert resp.status_code == 200, resp.text
    k = resp.json()
    assert (k["members"], k["active_members_30d"]) == (1, 1)
    assert (k["points_issued"], k["points_expired"], k["points_redeemed"]) == (300, 100, 50)
    assert (k["points_outstanding"], k["liability"]) == (150, 7.5)
    assert (k["breakage_rate"], k["redemption_rate"]) == (100 / 300, 50 / 300)
    assert (k["member_orders"], k["member_average_basket"]) == (1, 80.0)
    assert (k["non_member_orders"], k["non_member_average_basket"]) == (3, 20.0)
    assert k["non_member_purchase_frequency"] == 1.5
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 150
        assert session.get(Member, member.id) is not None
