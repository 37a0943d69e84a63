"""Metrics of the other packages, each compared with an independent count of a small dataset."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from cdp.config import Settings
from cdp.db import Database, new_id
from cdp.warehouse import Warehouse
from dashboards import service
from identity import service as identity_service
from identity.rules import IdentityRules
from loyalty import service as loyalty_service
from loyalty.models import LedgerEntry, Lot, Member, Tier
from tests.conftest import BACKENDS
from tests.dashboards.conftest import DAY, at, aware, load_batches
from tests.identity.conftest import Ev, EventWriter
from tests.loyalty.conftest import make_program

Point = tuple[date, str | None]


def _values(
    db: Database,
    warehouse: Warehouse,
    metric: str,
    start: date,
    end: date,
    **kw: object,
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


def _stage(warehouse: Warehouse, table: str, frame: pl.DataFrame) -> None:
    with warehouse.transaction() as cur:
        cur.register("staged", frame.to_arrow())
        cur.execute(f"INSERT INTO {table} BY NAME SELECT * FROM staged")
        cur.unregister("staged")


def test_rejected_events_and_duplicates_match_the_load_tables(
    db: Database, warehouse: Warehouse
) -> None:
    rejections = [
        ("web", "http", at(DAY, 1)),
        ("web", "http", at(DAY, 20)),
        ("crm", "file", at(DAY, 3)),
        ("crm", "file", at(DAY + timedelta(days=2), 5)),
    ]
    _stage(
        warehouse,
        "ingest_rejections",
        pl.DataFrame(
            {
                "source_id": [r[0] for r in rejections],
                "channel": [r[1] for r in rejections],
                "position": list(range(len(rejections))),
                "reason": ["bad"] * len(rejections),
                "rejected_at": [r[2] for r in rejections],
            }
        ),
    )
    batches = [("web", "http", at(DAY, 2)), ("crm", "file", at(DAY, 4)), ("web", "http", at(DAY))]
    load_batches(warehouse, batches)
    duplicates = [3, 0, 5]
    _stage(
        warehouse,
        "ingest_batch_stats",
        pl.DataFrame(
            {
                "batch_id": [1, 2, 3],
                "source_id": [b[0] for b in batches],
                "received": [10, 10, 10],
                "duplicates": duplicates,
                "rejected": [0, 0, 0],
                "identifiers_dropped": [0, 0, 0],
            }
        ),
    )
    end = DAY + timedelta(days=6)
    by_day = Counter((r[2].date(), None) for r in rejections)
    assert _values(db, warehouse, "events_rejected", DAY, end) == by_day
    by_source = Counter((r[2].date(), r[0]) for r in rejections)
    assert _values(db, warehouse, "events_rejected", DAY, end, breakdown="source") == by_source
    dup: Counter[Point] = Counter()
    for (source, _, when), count in zip(batches, duplicates, strict=True):
        dup[(when.date(), source)] += count
    expected = {k: v for k, v in dup.items() if v}
    assert _values(db, warehouse, "duplicates_dropped", DAY, end, breakdown="source") == expected


def test_merges_and_identifiers_per_profile_match_identity_resolution(
    db: Database, warehouse: Warehouse
) -> None:
    events = EventWriter(warehouse)
    settings, rules = Settings(), IdentityRules()
    identifiers = [
        ("anonymous_id", "d1"),
        ("email", "a@x.io"),
        ("email", "b@x.io"),
        ("phone", "+33612345678"),
    ]
    events.write([Ev([ident]) for ident in identifiers])
    identity_service.resolve(warehouse, settings=settings, rules=rules)
    before = {identity_service.lookup(warehouse, kind=k, value=v) for k, v in identifiers}
    # One login ties d1 to a@x.io, a form ties b@x.io to the phone: two merges.
    events.write(
        [
            Ev([("anonymous_id", "d1"), ("email", "a@x.io")]),
            Ev([("email", "b@x.io"), ("phone", "+33612345678")]),
        ]
    )
    identity_service.resolve(warehouse, settings=settings, rules=rules)
    after = {identity_service.lookup(warehouse, kind=k, value=v) for k, v in identifiers}
    assert None not in before
    assert None not in after
    today = service.today()
    merges = len(before) - len(after)
    assert merges == 2
    assert _values(db, warehouse, "merge_rate", today - timedelta(days=1), today) == {
        (today, None): merges
    }
    per_profile = _values(db, warehouse, "identifiers_per_profile", today, today)
    assert per_profile == {(today, None): len(identifiers) / len(after)}
    by_kind = _values(
        db, warehouse, "identifiers_per_profile", today, today, breakdown="identifier_kind"
    )
    kinds = Counter(k for k, _ in identifiers)
    assert by_kind == {(today, k): n / len(after) for k, n in kinds.items()}
    # A range that ends before today knows no level (the snapshots keep the history).
    assert _values(db, warehouse, "identifiers_per_profile", DAY, DAY) == {}


def test_segment_sizes_entries_and_exits_match_the_refresh_log(
    db: Database, warehouse: Warehouse
) -> None:
    refreshes = [  # segment, refreshed at, size, entries, exits
        ("s1", at(DAY, 1), 10, 10, 0),
        ("s1", at(DAY, 9), 12, 3, 1),
        ("s2", at(DAY, 5), 4, 4, 0),
        ("s1", at(DAY + timedelta(days=1), 8), 7, 0, 5),
        ("s2", at(DAY + timedelta(days=3), 8), 6, 2, 0),
    ]
    _stage(
        warehouse,
        "segment_refreshes",
        pl.DataFrame(
            {
                "refresh_id": list(range(1, len(refreshes) + 1)),
                "segment_id": [r[0] for r in refreshes],
                "segment_version": [1] * len(refreshes),
                "refreshed_at": [r[1] for r in refreshes],
                "size": [r[2] for r in refreshes],
                "entries": [r[3] for r in refreshes],
                "exits": [r[4] for r in refreshes],
            }
        ),
    )
    end = DAY + timedelta(days=6)
    last: dict[Point, tuple[datetime, int]] = {}
    entries: Counter[Point] = Counter()
    exits: Counter[Point] = Counter()
    for segment, when, size, came, left in refreshes:
        point = (when.date(), segment)
        if point not in last or last[point][0] < when:
            last[point] = (when, size)
        entries[point] += came
        exits[point] += left
    sizes = {k: float(v[1]) for k, v in last.items()}
    assert _values(db, warehouse, "segment_size", DAY, end, breakdown="segment") == sizes
    assert _values(db, warehouse, "segment_entries", DAY, end, breakdown="segment") == {
        k: v for k, v in entries.items() if v
    }
    assert _values(db, warehouse, "segment_exits", DAY, end, breakdown="segment") == {
        k: v for k, v in exits.items() if v
    }
    weekly = _values(db, warehouse, "segment_entries", DAY, end, grain="week")
    assert weekly == {(DAY, None): sum(entries.values())}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_points_flows_and_enrolments_match_the_ledger(db: Database, warehouse: Warehouse) -> None:
    club, other = make_program(db, name="Club"), make_program(db, name="Other")
    members = [  # program, enrolled day offset, status
        (club, 0, "active"),
        (club, 0, "merged"),
        (club, 1, "active"),
        (other, 1, "unenrolled"),
    ]
    entries = [  # member index, kind, points, day offset
        (0, "earn", 100, 0),
        (0, "earn", 40, 1),
        (0, "adjust", 15, 1),
        (0, "adjust", -10, 1),
        (0, "redeem", -60, 1),
        (0, "refund", 20, 2),
        (2, "import", 500, 1),
        (2, "expire", -30, 2),
        (2, "reverse", -5, 2),
        (3, "earn", 7, 0),
        (3, "redeem", -7, 2),
    ]
    with db.begin() as session:
        ids = []
        for program, offset, status in members:
            member = Member(
                id=new_id(),
                program_id=program.id,
                profile_id=new_id(),
                status=status,
                enrolled_at=aware(DAY + timedelta(days=offset)),
            )
            session.add(member)
            ids.append((member.id, program.id))
        session.flush()
        for i, (who, kind, points, offset) in enumerate(entries):
            when = aware(DAY + timedelta(days=offset))
            session.add(
                LedgerEntry(
                    program_id=ids[who][1],
                    member_id=ids[who][0],
                    kind=kind,
                    points=points,
                    occurred_at=when,
                    local_date=when.date(),
                    idempotency_key=f"test:{i}",
                )
            )
    end = DAY + timedelta(days=6)

    def expected(kinds: set[str], sign: int, *, positive_adjust: bool = False) -> Counter[Point]:
        flow: Counter[Point] = Counter()
        for who, kind, points, offset in entries:
            if kind in kinds or (positive_adjust and kind == "adjust" and points > 0):
                flow[(DAY + timedelta(days=offset), ids[who][1])] += sign * points
        return flow

    issued = expected({"earn", "import", "bonus"}, 1, positive_adjust=True)
    redeemed = expected({"redeem", "refund"}, -1)
    expired = expected({"expire"}, -1)
    for metric, flow in (
        ("points_issued", issued),
        ("points_redeemed", redeemed),
        ("points_expired", expired),
    ):
        by_program = _values(db, warehouse, metric, DAY, end, breakdown="program")
        assert by_program == {k: v for k, v in flow.items() if v}, metric
        club_only = _values(db, warehouse, metric, DAY, end, program_id=club.id)
        totals: Counter[Point] = Counter()
        for (day, program_id), v in flow.items():
            if program_id == club.id:
                totals[(day, None)] += v
        assert club_only == {k: v for k, v in totals.items() if v}, metric
    enrolled = Counter(
        (DAY + timedelta(days=offset), program.id)
        for program, offset, status in members
        if status != "merged"
    )
    assert _values(db, warehouse, "enrolments", DAY, end, breakdown="program") == enrolled
    weekly = _values(db, warehouse, "points_issued", DAY, end, grain="week")
    assert weekly == {(DAY, None): sum(issued.values())}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_programme_levels_active_members_and_redemption_rate_match_the_ledger(
    db: Database, warehouse: Warehouse
) -> None:
    club = make_program(db, name="Club", point_value=0.01)
    other = make_program(db, name="Other", point_value=0.05)
    now = datetime.now(UTC)
    with db.begin() as session:
        gold = Tier(program_id=club.id, name="Gold", rank=2, threshold=100)
        silver = Tier(program_id=club.id, name="Silver", rank=1, threshold=0)
        session.add_all([gold, silver])
        session.flush()
        people = [  # program, status, tier
            (club, "active", gold.id),
            (club, "active", silver.id),
            (club, "active", gold.id),
            (club, "merged", gold.id),
            (club, "opted_out", None),
            (other, "active", None),
        ]
        ids = []
        for program, status, tier_id in people:
            member = Member(
                program_id=program.id, profile_id=new_id(), status=status, tier_id=tier_id
            )
            session.add(member)
            session.flush()
            ids.append((member.id, program.id))
        lots = [  # member index, remaining, expires in days (None: never)
            (0, 100, None),
            (0, 50, -1),
            (1, 30, 10),
            (2, 0, None),
            (5, 200, 5),
        ]
        flows = [  # member index, kind, points, day offset
            (0, "earn", 100, 0),
            (1, "earn", 50, 0),
            (1, "redeem", -20, 0),
            (2, "redeem", -10, 1),
            (2, "adjust", 40, 1),
            (5, "earn", 30, 0),
        ]
        for i, (who, kind, points, offset) in enumerate(flows):
            when = aware(DAY + timedelta(days=offset))
            session.add(
                LedgerEntry(
                    program_id=ids[who][1],
                    member_id=ids[who][0],
                    kind=kind,
                    points=points,
                    occurred_at=when,
                    local_date=when.date(),
                    idempotency_key=f"flow:{i}",
                )
            )
        for i, (who, remaining, days) in enumerate(lots):
            entry = LedgerEntry(
                program_id=ids[who][1],
                member_id=ids[who][0],
                kind="earn",
                points=remaining,
                occurred_at=now - timedelta(days=400),
                local_date=(now - timedelta(days=400)).date(),
                idempotency_key=f"lot:{i}",
            )
            session.add(entry)
            session.flush()
            session.add(
                Lot(
                    entry_id=entry.id,
                    program_id=ids[who][1],
                    member_id=ids[who][0],
                    points=remaining,
                    remaining=remaining,
                    earned_at=entry.occurred_at,
                    expires_at=None if days is None else now + timedelta(days=days),
                )
            )
    today = service.today()
    week = today - timedelta(days=today.weekday())
    levels = (today - timedelta(days=3), today)
    live = [(p, s, t) for p, s, t in people if s != "merged"]
    assert _values(db, warehouse, "members", *levels) == {(today, None): len(live)}
    by_status = Counter((today, s) for _, s, _ in live)
    assert _values(db, warehouse, "members", *levels, breakdown="status") == by_status
    assert _values(db, warehouse, "members", *levels, program_id=other.id) == {(today, None): 1}
    assert _values(db, warehouse, "members", *levels, grain="week") == {(week, None): len(live)}
    # Before today nothing is known (the daily snapshots keep the history).
    assert _values(db, warehouse, "members", DAY, DAY) == {}

    value = {club.id: 0.01, other.id: 0.05}
    liability: dict[Point, float] = {}
    for who, remaining, days in lots:
        if days is None or days > 0:
            point = (today, ids[who][1])
            liability[point] = liability.get(point, 0.0) + remaining * value[ids[who][1]]
    got = _values(db, warehouse, "points_liability", *levels, breakdown="program")
    assert got == pytest.approx({k: v for k, v in liability.items() if v})

    names = {None: "none", gold.id: "Gold", silver.id: "Silver"}
    tiers = Counter((today, names[t]) for p, s, t in people if s == "active" and p.id == club.id)
    got_tiers = _values(
        db, warehouse, "tier_distribution", *levels, breakdown="tier", program_id=club.id
    )
    assert got_tiers == tiers

    end = DAY + timedelta(days=6)
    active: dict[Point, set[str]] = {}
    for who, kind, _, offset in flows:
        if kind in ("earn", "redeem"):
            active.setdefault((DAY + timedelta(days=offset), None), set()).add(ids[who][0])
    assert _values(db, warehouse, "active_members", DAY, end) == {
        k: len(v) for k, v in active.items()
    }
    weekly_active = {ids[w][0] for w, k, _, _ in flows if k in ("earn", "redeem")}
    assert _values(db, warehouse, "active_members", DAY, end, grain="week") == {
        (DAY, None): len(weekly_active)
    }
    rate: dict[Point, float] = {}
    for offset in (0, 1):
        day_flows = [(k, p) for _, k, p, o in flows if o == offset]
        issued = sum(p for k, p in day_flows if k in ("earn", "adjust") and p > 0)
        redeemed = -sum(p for k, p in day_flows if k == "redeem")
        rate[(DAY + timedelta(days=offset), None)] = redeemed / issued
    assert _values(db, warehouse, "redemption_rate", DAY, end) == pytest.approx(rate)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_active_members_count_a_person_once_after_their_memberships_merged(
    db: Database, warehouse: Warehouse
) -> None:
    club = make_program(db, name="Club")
    when = aware(DAY)
    with db.begin() as session:
        members = [
            loyalty_service.change_membership(
                session, program_id=club.id, profile_id=profile, action="enrol", at=when
            )
            for profile in ("p-web", "p-till", "p-other")
        ]
        for i, member in enumerate(members):
            session.add(
                LedgerEntry(
                    program_id=club.id,
                    member_id=member.id,
                    kind="earn",
                    points=10,
                    occurred_at=when,
                    local_date=when.date(),
                    idempotency_key=f"earn:{i}",
                )
            )
        session.flush()
        # Identity finds that the web and till profiles are one person.
        loyalty_service.merge_profiles(
            session, program_id=club.id, from_profile_id="p-till", to_profile_id="p-web"
        )
    end = DAY + timedelta(days=1)
    assert _values(db, warehouse, "active_members", DAY, end) == {(DAY, None): 2}
    assert _values(db, warehouse, "active_members", DAY, end, breakdown="program") == {
        (DAY, club.id): 2
    }
