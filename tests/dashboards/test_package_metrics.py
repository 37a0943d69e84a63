"""Metrics of the other packages, each compared with an independent count of a small dataset."""

from __future__ import annotations

from collections import Counter
from datetime import date, datetime, timedelta

import polars as pl
import pytest

from cdp.config import Settings
from cdp.db import Database, new_id
from cdp.warehouse import Warehouse
from dashboards import service
from identity import service as identity_service
from identity.rules import IdentityRules
from loyalty.models import LedgerEntry, Member
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
