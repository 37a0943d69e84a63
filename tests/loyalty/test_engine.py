"""The earning engine: formulas, conditions, stacking, caps, refunds, replays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pytest
from sqlalchemy import select

from cdp.db import Database
from loyalty import engine, ledger, service
from loyalty.models import Activity, LedgerEntry, Member, Program, Rule, Tier
from loyalty.schemas import RuleCreate
from tests.conftest import BACKENDS
from tests.loyalty.conftest import T0, make_member, make_program
from tests.loyalty.events import ev, frame


def _rule(db: Database, program: Program, **fields: Any) -> str:  # Any: rule fields
    body: dict[str, Any] = {  # Any: rule fields
        "name": "r",
        "event_name": "Order Completed",
        "formula": {"type": "per_amount", "rate": 1},
        **fields,
    }
    with db.begin() as session:
        return service.create_rule(session, program_id=program.id, data=RuleCreate(**body)).id


def _process(db: Database, program: Program, rows: list[dict[str, Any]], **kw: Any) -> None:
    with db.begin() as session:
        stored = session.get(Program, program.id)
        assert stored is not None
        engine.process_events(session, program=stored, events=frame(rows), **kw)


def _earned(db: Database, program: Program) -> list[tuple[str, str | None, int]]:
    with db.begin() as session:
        rows = session.execute(
            select(Member.profile_id, LedgerEntry.message_id, LedgerEntry.points)
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(LedgerEntry.program_id == program.id, LedgerEntry.kind == "earn")
            .order_by(LedgerEntry.message_id, LedgerEntry.points)
        ).all()
    return [(str(p), m, int(x)) for p, m, x in rows]


def test_per_amount_formula_rounds_with_the_rule_mode(db: Database) -> None:
    program = make_program(db)
    make_member(db, program, "a")
    _rule(db, program, name="floor", formula={"type": "per_amount", "rate": 1})
    _rule(db, program, name="ceil", formula={"type": "per_amount", "rate": 1, "rounding": "ceil"})
    _rule(
        db,
        program,
        name="cents",
        formula={"type": "per_amount", "rate": 100, "rounding": "half_even"},
    )
    _process(db, program, [ev("a", T0, event_id=1, total=20.29)])
    assert sorted(p for _, _, p in _earned(db, program)) == [20, 21, 2029]


def test_per_line_formula_multiplies_categories_and_fixes_skus(db: Database) -> None:
    program = make_program(db)
    make_member(db, program, "a")
    _rule(
        db,
        program,
        formula={
            "type": "per_line",
            "lines": [
                {"match": {"sku": ["GIFT"]}, "fixed_per_unit": 50},
                {"match": {"category": ["shoes"]}, "multiplier": 2},
                {"match": {"brand": ["Acme"], "category": ["hats"]}, "multiplier": 3},
            ],
        },
    )
    products = [
        {"sku": "S1", "category": "shoes", "brand": "X", "price": 40.5, "quantity": 2},
        {"sku": "GIFT", "category": "shoes", "price": 0, "quantity": 3},
        {"sku": "H1", "category": "hats", "brand": "Acme", "price": 10},
        {"sku": "T1", "category": "tees", "brand": "Acme", "price": 9.99, "quantity": 1},
    ]
    _process(db, program, [ev("a", T0, event_id=1, products=products)])
    # shoes 81*2=162, gift 3*50=150, Acme hat 10*3=30, tee 9.99 → 351.99 floored.
    assert _earned(db, program) == [("a", "m1", 351)]


def test_conditions_read_properties_member_tier_seniority_and_traits(db: Database) -> None:
    program = make_program(db)
    with db.begin() as session:
        session.add(Tier(program_id=program.id, name="Gold", rank=2, threshold=1, multiplier=1))
    for profile in ("gold", "new", "fr"):
        make_member(db, program, profile)
    with db.begin() as session:
        gold = session.scalar(select(Tier).where(Tier.name == "Gold"))
        member = service.member_by_profile(session, program_id=program.id, profile_id="gold")
        assert gold is not None
        member.tier_id = gold.id
    _rule(
        db,
        program,
        name="big gold basket",
        formula={"type": "fixed", "points": 100},
        condition={
            "all": [
                {"field": "properties.total", "op": "gte", "value": 50},
                {"field": "member.tier", "op": "in", "value": ["Gold", "Platinum"]},
            ]
        },
        apply_tier_multiplier=False,
    )
    _rule(
        db,
        program,
        name="loyal for a year",
        formula={"type": "fixed", "points": 7},
        condition={"field": "member.seniority_days", "op": "gte", "value": 365},
    )
    _rule(
        db,
        program,
        name="not french",
        formula={"type": "fixed", "points": 3},
        condition={"not": {"field": "traits.country", "value": "FR"}},
    )
    later = T0 + timedelta(days=400)
    rows = [
        ev("gold", T0, event_id=1, total=60),
        ev("gold", T0, event_id=2, total=40),
        ev("new", later, event_id=3, total=60),
        ev("fr", T0, event_id=4, total=1),
    ]
    traits = pl.DataFrame(
        {"profile_id": ["fr", "gold"], "traits": ['{"country": "FR"}', '{"country": "DE"}']}
    )
    _process(
        db, program, rows, profile_data=lambda ids: traits.filter(pl.col("profile_id").is_in(ids))
    )
    assert _earned(db, program) == [
        ("gold", "m1", 3),
        ("gold", "m1", 100),
        ("gold", "m2", 3),
        ("new", "m3", 3),
        ("new", "m3", 7),
    ]


def test_exclusive_rule_stops_later_rules_and_windows_bound_campaigns(db: Database) -> None:
    program = make_program(db)
    make_member(db, program, "a")
    _rule(
        db,
        program,
        name="black friday",
        priority=1,
        exclusive=True,
        formula={"type": "per_amount", "rate": 3},
        starts_at=T0.isoformat(),
        ends_at=(T0 + timedelta(days=1)).isoformat(),
    )
    _rule(db, program, name="base", priority=10)
    _process(
        db,
        program,
        [
            ev("a", T0 - timedelta(hours=1), event_id=1, total=10),
            ev("a", T0, event_id=2, total=10),
            ev("a", T0 + timedelta(days=1), event_id=3, total=10),
        ],
    )
    assert _earned(db, program) == [("a", "m1", 10), ("a", "m2", 30), ("a", "m3", 10)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_exclusive_rule_capped_to_nothing_does_not_block_later_rules(db: Database) -> None:
    rows = [
        ev("a", T0, event_id=1, total=10),
        ev("a", T0 + timedelta(hours=1), event_id=2, total=50),
        ev("a", T0 + timedelta(days=1), event_id=3, total=5),
    ]
    for one_by_one in (False, True):
        program = make_program(db, name=f"Club {one_by_one}")
        make_member(db, program, "a")
        _rule(
            db,
            program,
            name="promo x3",
            priority=1,
            exclusive=True,
            formula={"type": "per_amount", "rate": 3},
            cap_per_day=30,
        )
        _rule(db, program, name="base", priority=10)
        for batch in [[row] for row in rows] if one_by_one else [rows]:
            _process(db, program, batch)
        # The promo's day is used up by m1: m2 earns its base points; the next day, the
        # promo fires again and blocks the base rule.
        assert _earned(db, program) == [("a", "m1", 30), ("a", "m2", 50), ("a", "m3", 15)]
        # A replay sees the promo's own awards in its caps, yet blocks where they blocked.
        _process(db, program, rows)
        assert _earned(db, program) == [("a", "m1", 30), ("a", "m2", 50), ("a", "m3", 15)]


def test_tier_multiplier_applies_to_rules_that_opt_in(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program, "a")
    with db.begin() as session:
        tier = Tier(program_id=program.id, name="Gold", rank=1, threshold=0, multiplier=1.5)
        session.add(tier)
        session.flush()
        stored = session.get(Member, member.id)
        assert stored is not None
        stored.tier_id = tier.id
    _rule(db, program, name="base")
    _rule(
        db,
        program,
        name="flat",
        formula={"type": "fixed", "points": 5},
        apply_tier_multiplier=False,
    )
    _process(db, program, [ev("a", T0, event_id=1, total=11)])
    assert sorted(p for _, _, p in _earned(db, program)) == [5, 16]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_daily_cap_counts_local_days_and_what_the_ledger_already_holds(db: Database) -> None:
    program = make_program(db, timezone="Europe/Paris")
    make_member(db, program, "a")
    _rule(db, program, cap_per_day=100)
    # 21:30Z and 21:50Z on 24 Oct are the 24th in Paris; 22:10Z is already the 25th.
    day = datetime(2026, 10, 24, 21, 30, tzinfo=UTC)
    _process(db, program, [ev("a", day, event_id=1, total=70)])
    _process(
        db,
        program,
        [
            ev("a", day + timedelta(minutes=20), event_id=2, total=70),
            ev("a", day + timedelta(minutes=25), event_id=3, total=70),
            ev("a", day + timedelta(minutes=40), event_id=4, total=70),
        ],
    )
    assert _earned(db, program) == [("a", "m1", 70), ("a", "m2", 30), ("a", "m4", 70)]


def test_monthly_cap_budget_and_first_purchase_limit(db: Database) -> None:
    program = make_program(db)
    for p in ("a", "b"):
        make_member(db, program, p)
    _rule(db, program, name="monthly", cap_per_month=50)
    _rule(db, program, name="budget", formula={"type": "fixed", "points": 30}, budget=70)
    _rule(db, program, name="first", formula={"type": "fixed", "points": 500}, limit_per_member=1)
    rows = [
        ev("a", T0, event_id=1, total=40),
        ev("b", T0 + timedelta(hours=1), event_id=2, total=40),
        ev("a", T0 + timedelta(hours=2), event_id=3, total=40),
        ev("a", T0 + timedelta(days=31), event_id=4, total=40),
    ]
    _process(db, program, rows)
    with db.begin() as session:
        got = session.execute(
            select(LedgerEntry.message_id, LedgerEntry.points, LedgerEntry.rule_id)
        ).all()
    with db.begin() as session:
        names = {str(i): str(n) for i, n in session.execute(select(Rule.id, Rule.name)).all()}
    awarded = sorted((m, names[str(r)], p) for m, p, r in got)
    assert awarded == [
        ("m1", "budget", 30),
        ("m1", "first", 500),
        ("m1", "monthly", 40),
        ("m2", "budget", 30),
        ("m2", "first", 500),
        ("m2", "monthly", 40),
        ("m3", "budget", 10),
        ("m3", "monthly", 10),
        ("m4", "monthly", 40),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_limits_and_caps_count_what_merged_memberships_earned(db: Database) -> None:
    program = make_program(db)
    for p in ("guest", "account"):
        make_member(db, program, p)
    _rule(db, program, name="daily", cap_per_day=50)
    _rule(db, program, name="first", formula={"type": "fixed", "points": 100}, limit_per_member=1)
    _process(db, program, [ev("guest", T0, event_id=1, total=40)])
    with db.begin() as session:
        service.merge_profiles(
            session, program_id=program.id, from_profile_id="guest", to_profile_id="account"
        )
    # Same person, same day: no second first-purchase bonus, and the daily cap has 10 left.
    _process(db, program, [ev("account", T0 + timedelta(hours=1), event_id=2, total=40)])
    assert _earned(db, program) == [
        ("guest", "m1", 40),
        ("guest", "m1", 100),
        ("account", "m2", 10),
    ]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_replaying_events_awards_nothing_more(db: Database) -> None:
    program = make_program(db, enrolment="automatic")
    _rule(db, program)
    rows = [ev("a", T0, event_id=1, total=10), ev("b", T0, event_id=2, total=20)]
    _process(db, program, rows)
    before = _earned(db, program)
    _process(db, program, rows)
    _process(db, program, rows[1:])
    assert _earned(db, program) == before == [("a", "m1", 10), ("b", "m2", 20)]
    with db.begin() as session:
        assert len(session.scalars(select(Activity)).all()) == 2
        members = session.scalars(select(Member)).all()
        assert {m.profile_id: m.enrolled_at for m in members} == {"a": T0, "b": T0}


def test_explicit_enrolment_ignores_events_of_non_members(db: Database) -> None:
    program = make_program(db)
    _rule(db, program)
    _process(db, program, [ev("stranger", T0, event_id=1, total=10)])
    assert _earned(db, program) == []


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_partial_refunds_reverse_points_in_proportion_and_add_up_to_the_whole(
    db: Database,
) -> None:
    program = make_program(db, pending_days=30)
    member = make_member(db, program, "a")
    _rule(db, program)
    _process(db, program, [ev("a", T0, event_id=1, order_id="o1", total=101)])
    refund = "Order Refunded"
    _process(db, program, [ev("a", T0 + timedelta(days=1), refund, 2, order_id="o1", total=50)])
    with db.begin() as session:
        # 101 points for 101 euros; 50 euros back → round(101 * 50/101) = 50 reversed.
        assert ledger.lots_sum(session, member_id=member.id) == 51
        assert service.qualifying_points(session, member_id=member.id) == 51
    _process(
        db,
        program,
        [
            ev("a", T0 + timedelta(days=2), refund, 3, order_id="o1", total=51),
            ev("a", T0 + timedelta(days=2), refund, 3, order_id="o1", total=51),
        ],
    )
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 0
        assert ledger.entries_sum(session, member_id=member.id) == 0
        assert service.qualifying_points(session, member_id=member.id) == 0
        reversals = session.scalars(
            select(LedgerEntry.points).where(LedgerEntry.kind == "reverse")
        ).all()
        assert sorted(reversals) == [-51, -50]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_refunding_one_line_of_an_order_without_total_reverses_that_line_s_share(
    db: Database,
) -> None:
    program = make_program(db)
    member = make_member(db, program, "a")
    _rule(db, program, formula={"type": "per_line", "rate": 1})
    lines = [
        {"sku": "A", "price": 30, "quantity": 2},
        {"sku": "B", "price": 40},
    ]
    _process(db, program, [ev("a", T0, event_id=1, order_id="o1", products=lines)])
    refund = ev("a", T0 + timedelta(days=1), "Order Refunded", 2, order_id="o1", products=lines[1:])
    _process(db, program, [refund])
    with db.begin() as session:
        # The order's spend is its lines' 2 x 30 + 40 = 100; 40 back reverses 40% of its 100 points.
        spend = session.scalars(select(Activity.spend).order_by(Activity.event_id)).all()
        assert spend == [100.0, -40.0]
        assert ledger.lots_sum(session, member_id=member.id) == 60


def test_refund_without_amount_reverses_the_whole_order(db: Database) -> None:
    program = make_program(db)
    member = make_member(db, program, "a")
    _rule(db, program)
    _rule(db, program, name="bonus", formula={"type": "fixed", "points": 5})
    _process(db, program, [ev("a", T0, event_id=1, order_id="o9", total=30)])
    _process(db, program, [ev("a", T0, "Order Refunded", 2, order_id="o9")])
    with db.begin() as session:
        assert ledger.lots_sum(session, member_id=member.id) == 0
