"""Tier movements, top rewards, members vs non-members, segment overlap, blocked values hit:
each compared with an independent computation of a small dataset."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from cdp.config import Settings
from cdp.db import Database, new_id
from cdp.warehouse import Warehouse
from dashboards import service
from dashboards.errors import SegmentsRequired, UnknownSegment
from identity import service as identity_service
from identity.rules import IdentityRules
from loyalty import service as loyalty_service
from loyalty.models import Member, Redemption, Reward, Tier, TierChange
from segments.models import SegmentsSegment
from tests.conftest import BACKENDS
from tests.dashboards.conftest import DAY, at, aware
from tests.identity.conftest import T0, Ev, EventWriter
from tests.loyalty.conftest import make_program

Point = tuple[date, str | None]


def _values(
    db: Database, warehouse: Warehouse, metric: str, start: date, end: date, **kw: object
) -> dict[Point, float]:
    """The non-zero points of a metric's series."""
    with db.begin() as session:
        series = service.kpi_series(
            session,
            warehouse=warehouse,
            metric=metric,
            start=start,
            end=end,
            **kw,  # type: ignore[arg-type]
        )
    return {(r["period"], r["key"]): r["value"] for r in series.frame.to_dicts() if r["value"]}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_tier_movements_and_top_rewards_match_the_tier_history_and_redemptions(
    db: Database, warehouse: Warehouse
) -> None:
    club, other = make_program(db, name="Club"), make_program(db, name="Other")
    with db.begin() as session:
        silver = Tier(program_id=club.id, name="Silver", rank=1, threshold=0)
        gold = Tier(program_id=club.id, name="Gold", rank=2, threshold=100)
        bronze = Tier(program_id=other.id, name="Bronze", rank=1, threshold=0)
        session.add_all([silver, gold, bronze])
        session.flush()
        people = [club, club, other]
        members = []
        for program in people:
            member = Member(program_id=program.id, profile_id=new_id())
            session.add(member)
            session.flush()
            members.append(member)
        ranks = {None: 0, silver.id: 1, gold.id: 2, bronze.id: 1}
        changes = [  # member, from, to, day offset
            (0, None, silver.id, 0),
            (0, silver.id, gold.id, 0),
            (1, None, silver.id, 1),
            (0, gold.id, silver.id, 3),
            (1, silver.id, None, 3),
            (2, None, bronze.id, 1),
            (0, silver.id, silver.id, 2),  # same rank: not a movement
            (1, None, None, 2),  # no tier to no tier
        ]
        for who, old, new, offset in changes:
            session.add(
                TierChange(
                    program_id=members[who].program_id,
                    member_id=members[who].id,
                    from_tier_id=old,
                    to_tier_id=new,
                    reason="evaluation",
                    metric_value=0.0,
                    at=aware(DAY + timedelta(days=offset), 9),
                )
            )
        voucher = Reward(program_id=club.id, name="Voucher", kind="coupon", points_cost=100)
        bag = Reward(program_id=club.id, name="Tote bag", kind="product", points_cost=300)
        mug = Reward(program_id=other.id, name="Mug", kind="product", points_cost=50)
        session.add_all([voucher, bag, mug])
        session.flush()
        redemptions = [  # member, reward, status, day offset
            (0, voucher, "issued", 0),
            (1, voucher, "issued", 0),
            (0, voucher, "cancelled", 1),
            (1, bag, "issued", 1),
            (0, voucher, "used", 2),
            (2, mug, "issued", 2),
        ]
        for i, (who, reward, status, offset) in enumerate(redemptions):
            session.add(
                Redemption(
                    program_id=reward.program_id,
                    member_id=members[who].id,
                    reward_id=reward.id,
                    points=reward.points_cost,
                    coupon_code=f"C{i}",
                    status=status,
                    entry_id=new_id(),
                    created_at=aware(DAY + timedelta(days=offset), 15),
                )
            )
    end = DAY + timedelta(days=6)
    moves: Counter[Point] = Counter()
    club_moves: Counter[Point] = Counter()
    for who, old, new, offset in changes:
        if ranks[new] == ranks[old]:
            continue
        point = (
            DAY + timedelta(days=offset),
            "upgrades" if ranks[new] > ranks[old] else "downgrades",
        )
        moves[point] += 1
        if people[who] is club:
            club_moves[point] += 1
    assert _values(db, warehouse, "tier_movements", DAY, end) == moves
    assert _values(db, warehouse, "tier_movements", DAY, end, program_id=club.id) == club_moves
    weekly = _values(db, warehouse, "tier_movements", DAY, end, grain="week")
    assert weekly == {
        (DAY, d): sum(v for (_, k), v in moves.items() if k == d)
        for d in ("upgrades", "downgrades")
    }
    used: Counter[Point] = Counter()
    for _, reward, status, offset in redemptions:
        if status != "cancelled":
            used[(DAY + timedelta(days=offset), reward.name)] += 1
    assert _values(db, warehouse, "top_rewards", DAY, end) == used
    with db.begin() as session:
        series = service.kpi_series(
            session,
            warehouse=warehouse,
            metric="top_rewards",
            start=DAY,
            end=end,
            program_id=club.id,
        )
    assert series.keys == ["Voucher", "Tote bag"]  # most redeemed first, the mug is elsewhere
    assert service.series_csv(series).splitlines()[0] == "period,reward,value"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_members_vs_non_members_match_an_independent_count_of_orders(
    db: Database, warehouse: Warehouse
) -> None:
    events = EventWriter(warehouse)
    day1, day2 = T0.date(), T0.date() + timedelta(days=1)
    people = [("user_id", f"u{i}") for i in range(5)]
    orders = [  # person, when, properties
        (0, datetime.combine(day1, datetime.min.time()) + timedelta(hours=9), {"total": 50.0}),
        (0, datetime.combine(day1, datetime.min.time()) + timedelta(hours=18), {"total": 30.0}),
        (1, datetime.combine(day1, datetime.min.time()) + timedelta(hours=10), {"revenue": 20.0}),
        (2, datetime.combine(day1, datetime.min.time()) + timedelta(hours=11), {"total": 100.0}),
        (3, datetime.combine(day2, datetime.min.time()) + timedelta(hours=8), {"total": 7.5}),
        (1, datetime.combine(day2, datetime.min.time()) + timedelta(hours=12), {"total": 40.0}),
        (4, datetime.combine(day2, datetime.min.time()) + timedelta(hours=13), {}),
    ]
    events.write(
        [
            Ev([people[who]], type="track", event="Order Completed", at=when, properties=props)
            for who, when, props in orders
        ]
        + [Ev([people[0]], type="track", event="Product Viewed", at=orders[0][1])]
    )
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())
    profiles = [identity_service.lookup(warehouse, kind=k, value=v) for k, v in people]
    club, other = make_program(db, name="Club"), make_program(db, name="Other")
    # Person 0 is a member from the start; person 1 joins at noon on day 2, so their order of
    # day 1 is a non-member's and the one at noon on day 2 a member's; person 2 is in Other.
    enrolments = [
        (0, club, datetime.combine(day1, datetime.min.time())),
        (1, club, datetime.combine(day2, datetime.min.time()) + timedelta(hours=12)),
        (2, other, datetime.combine(day1, datetime.min.time())),
    ]
    with db.begin() as session:
        for who, program, when in enrolments:
            session.add(
                Member(
                    program_id=program.id,
                    profile_id=profiles[who],
                    enrolled_at=when.replace(tzinfo=UTC),
                )
            )
        session.flush()
        loyalty_service.publish_member_snapshot(session, warehouse)

    def expected(program_ids: set[str]) -> dict[Point, float]:
        groups: dict[tuple[date, str], list[tuple[int, float]]] = {}
        for who, when, props in orders:
            member = any(w == who and p.id in program_ids and e <= when for w, p, e in enrolments)
            amount = props.get("total", props.get("revenue", 0.0))
            key = (when.date(), "members" if member else "non-members")
            groups.setdefault(key, []).append((who, amount))
        out: dict[Point, float] = {}
        for (day, group), rows in groups.items():
            spend, n, buyers = sum(a for _, a in rows), len(rows), len({w for w, _ in rows})
            for measure, value in (
                ("average basket", spend / n),
                ("purchases per customer", n / buyers),
                ("spend per customer", spend / buyers),
            ):
                if value:
                    out[(day, f"{group}: {measure}")] = value
        return out

    everyone = _values(db, warehouse, "member_vs_non_member", day1, day2)
    assert everyone == pytest.approx(expected({club.id, other.id}))
    club_only = _values(db, warehouse, "member_vs_non_member", day1, day2, program_id=club.id)
    assert club_only == pytest.approx(expected({club.id}))
    assert club_only[(day1, "members: purchases per customer")] == 2.0
    with db.begin() as session:
        series = service.kpi_series(
            session, warehouse=warehouse, metric="member_vs_non_member", start=day1, end=day2
        )
    assert series.keys[:2] == ["members: average basket", "non-members: average basket"]


def _segment(db: Database, name: str) -> str:
    with db.begin() as session:
        row = SegmentsSegment(name=name, rule={"field": "x", "op": "=", "value": 1})
        session.add(row)
        session.flush()
        return row.id


def test_segment_overlap_replays_the_published_entries_and_exits(
    db: Database, warehouse: Warehouse
) -> None:
    a, b, c = _segment(db, "A"), _segment(db, "B"), _segment(db, "C")
    rng = random.Random(7)
    rows = []
    inside: dict[tuple[str, str], bool] = {}
    for seq in range(1, 400):
        segment = rng.choice([a, b, c])
        profile = f"p{rng.randrange(25)}"
        when = at(DAY + timedelta(days=rng.randrange(-3, 6)), rng.randrange(24))
        rows.append((seq, segment, profile, when))
    rows.sort(key=lambda r: (r[3], r[0]))
    events = []
    for seq, segment, profile, when in rows:  # alternate entry / exit per (segment, profile)
        kind = "exit" if inside.get((segment, profile)) else "entry"
        inside[(segment, profile)] = kind == "entry"
        events.append((seq, segment, profile, kind, when))
    frame = pl.DataFrame(
        {
            "seq": [e[0] for e in events],
            "segment_id": [e[1] for e in events],
            "profile_id": [e[2] for e in events],
            "kind": [e[3] for e in events],
            "occurred_at": [e[4] for e in events],
            "refresh_id": [1] * len(events),
            "segment_version": [1] * len(events),
        }
    )
    with warehouse.transaction() as cur:
        cur.register("staged", frame.to_arrow())
        cur.execute("INSERT INTO segment_events BY NAME SELECT * FROM staged")
        cur.unregister("staged")
    start, end = DAY, DAY + timedelta(days=6)
    expected: dict[Point, float] = {}
    for offset in range(7):
        day = start + timedelta(days=offset)
        cutoff = at(day + timedelta(days=1), 0)
        state: dict[tuple[str, str], bool] = {}
        for _, segment, profile, kind, when in events:
            if when < cutoff:
                state[(segment, profile)] = kind == "entry"
        in_a = {p for (s, p), v in state.items() if v and s == a}
        in_b = {p for (s, p), v in state.items() if v and s == b}
        for key, n in (
            ("in both", len(in_a & in_b)),
            ("only in the first", len(in_a - in_b)),
            ("only in the second", len(in_b - in_a)),
        ):
            if n:
                expected[(day, key)] = n
    got = _values(db, warehouse, "segment_overlap", start, end, segments=(a, b))
    assert got == expected
    assert any(k == "in both" for _, k in got)
    weekly = _values(db, warehouse, "segment_overlap", start, end, grain="week", segments=(a, b))
    assert weekly == {(start, k): v for (d, k), v in expected.items() if d == end}
    with pytest.raises(SegmentsRequired):
        _values(db, warehouse, "segment_overlap", start, end)
    with pytest.raises(UnknownSegment):
        _values(db, warehouse, "segment_overlap", start, end, segments=(a, "nope"))


def test_blocked_values_hit_counts_events_carrying_blocked_or_capped_identifiers(
    db: Database, warehouse: Warehouse
) -> None:
    events = EventWriter(warehouse)
    batch = [
        Ev([("email", "test@test.com"), ("user_id", "u1")]),
        Ev([("email", "test@test.com")]),
        Ev([("email", "ok@x.io"), ("user_id", "u2")]),
        *[Ev([("email", "till@shop.io"), ("user_id", f"c{i}")]) for i in range(4)],
        Ev([("phone", "0000000000"), ("email", "till@shop.io")]),
    ]
    events.write(batch)
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules(auto_cap=3))
    statuses = {
        ("email", "test@test.com"): "blocked",
        ("phone", "0000000000"): "blocked",
        ("email", "till@shop.io"): "capped",
    }
    day = T0.date()  # every event of the writer is received on its first day
    by_status: Counter[Point] = Counter()
    by_kind: Counter[Point] = Counter()
    for event in batch:
        for ident in event.ids:
            if ident in statuses:
                by_status[(day, statuses[ident])] += 1
                by_kind[(day, ident[0])] += 1
    assert _values(db, warehouse, "blocked_values_hit", day, day, breakdown="status") == by_status
    kinds = _values(db, warehouse, "blocked_values_hit", day, day, breakdown="identifier_kind")
    assert kinds == by_kind
    assert _values(db, warehouse, "blocked_values_hit", day, day) == {
        (day, None): sum(by_status.values())
    }
