"""KPI series: grains, breakdowns, both stores, validation, and snapshots for days gone."""

from __future__ import annotations

from datetime import date, timedelta

import pytest

from cdp.db import Database, utcnow
from cdp.warehouse import Query, Warehouse
from dashboards import service
from dashboards.errors import InvalidRange, UnknownMetric, UnsupportedBreakdown
from dashboards.metrics import Catalogue, Metric
from loyalty.models import LedgerEntry, Member, Program
from loyalty.schemas import ProgramCreate
from tests.conftest import BACKENDS
from tests.dashboards.conftest import DAY, at, aware, load_events, load_job_runs
from tests.loyalty.conftest import make_program


def _series(
    db: Database, warehouse: Warehouse, metric: str, start: date, end: date, **kw: object
) -> service.KpiSeries:
    with db.begin() as session:
        return service.kpi_series(
            session,
            warehouse=warehouse,
            metric=metric,
            start=start,
            end=end,
            **kw,  # type: ignore[arg-type]
        )


def _points(series: service.KpiSeries) -> list[tuple[date, str | None, int]]:
    return [(r["period"], r["key"], r["value"]) for r in series.frame.to_dicts()]


def test_events_per_day_are_counted_by_received_day_with_empty_days_as_zero(
    db: Database, seeded: Warehouse
) -> None:
    series = _series(db, seeded, "events_received", DAY, DAY + timedelta(days=3))
    assert _points(series) == [
        (DAY, None, 3),
        (DAY + timedelta(days=1), None, 1),
        (DAY + timedelta(days=2), None, 1),
        (DAY + timedelta(days=3), None, 0),
    ]
    assert series.total == 5
    assert series.keys == []


def test_events_by_source_rank_keys_by_total(db: Database, seeded: Warehouse) -> None:
    series = _series(
        db, seeded, "events_received", DAY, DAY + timedelta(days=2), breakdown="source"
    )
    assert series.keys == ["web", "pos", "app"]
    by_key = {}
    for period, key, value in _points(series):
        by_key[(period, key)] = value
    assert by_key[(DAY, "web")] == 2
    assert by_key[(DAY, "pos")] == 1
    assert by_key[(DAY, "app")] == 0
    assert by_key[(DAY + timedelta(days=2), "app")] == 1
    assert series.total == 5


def test_week_and_month_grains_sum_the_days(db: Database, seeded: Warehouse) -> None:
    end = DAY + timedelta(days=7)
    weekly = _series(db, seeded, "events_received", DAY, end, grain="week")
    assert _points(weekly) == [(DAY, None, 5), (end, None, 1)]
    monthly = _series(db, seeded, "events_received", DAY, end, grain="month")
    expected: dict[date, int] = {}
    for day, count in ((DAY, 3), (DAY + timedelta(1), 1), (DAY + timedelta(2), 1), (end, 1)):
        month = day.replace(day=1)
        expected[month] = expected.get(month, 0) + count
    assert _points(monthly) == [(m, None, v) for m, v in sorted(expected.items())]


def test_identifiers_per_kind_and_batches_per_channel(db: Database, seeded: Warehouse) -> None:
    kinds = _series(
        db, seeded, "identifiers_seen", DAY, DAY + timedelta(days=2), breakdown="identifier_kind"
    )
    totals = {k: sum(v for _, key, v in _points(kinds) if key == k) for k in kinds.keys}
    assert totals == {"anonymous_id": 3, "email": 3, "user_id": 2, "phone": 1}
    batches = _series(
        db, seeded, "ingest_batches", DAY, DAY + timedelta(days=2), breakdown="channel"
    )
    assert batches.keys == ["http", "file"]
    assert batches.total == 3


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_job_runs_and_failures_per_utc_day_on_both_backends(
    db: Database, warehouse: Warehouse
) -> None:
    load_job_runs(
        db,
        [
            ("ingest.pull", "succeeded", aware(DAY, 0)),
            ("ingest.pull", "failed", aware(DAY, 23)),
            ("identity.resolve", "failed", aware(DAY + timedelta(days=1), 0)),
            ("identity.resolve", "succeeded", aware(DAY + timedelta(days=8), 0)),
        ],
    )
    runs = _series(db, warehouse, "job_runs", DAY, DAY + timedelta(days=1), breakdown="status")
    assert sorted(p for p in _points(runs) if p[2]) == [
        (DAY, "failed", 1),
        (DAY, "succeeded", 1),
        (DAY + timedelta(days=1), "failed", 1),
    ]
    failures = _series(
        db, warehouse, "job_failures", DAY, DAY + timedelta(days=13), grain="week", breakdown="job"
    )
    assert sorted(p for p in _points(failures) if p[2]) == [
        (DAY, "identity.resolve", 1),
        (DAY, "ingest.pull", 1),
    ]
    assert failures.total == 2


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_operational_metric_sql_truncates_weeks_and_months_in_the_database(
    db: Database, warehouse: Warehouse
) -> None:
    wednesday = DAY + timedelta(days=2)
    load_job_runs(db, [("a", "succeeded", aware(wednesday, 23)), ("a", "failed", aware(DAY, 0))])
    with db.begin() as session:
        expected = {"week": {DAY}, "month": {DAY.replace(day=1), wednesday.replace(day=1)}}
        for grain, periods_wanted in expected.items():
            frame = service.run_metric(
                session,
                warehouse=warehouse,
                metric=service.get_metric("job_runs"),
                start=DAY,
                end=wednesday,
                grain=grain,  # type: ignore[arg-type]
                breakdown=None,
                program_id=None,
            )
            assert set(frame.get_column("period").to_list()) == periods_wanted
            assert frame.get_column("value").sum() == 2


def test_unknown_metric_breakdown_or_range_is_refused(db: Database, seeded: Warehouse) -> None:
    with pytest.raises(UnknownMetric):
        _series(db, seeded, "no_such_metric", DAY, DAY)
    with pytest.raises(UnsupportedBreakdown) as err:
        _series(db, seeded, "events_received", DAY, DAY, breakdown="tier")
    assert err.value.status_code == 422
    with pytest.raises(InvalidRange):
        _series(db, seeded, "events_received", DAY, DAY - timedelta(days=1))


def test_snapshots_serve_days_whose_raw_data_is_gone(db: Database, seeded: Warehouse) -> None:
    end = DAY + timedelta(days=2)
    before = _series(db, seeded, "events_received", DAY, end, breakdown="source")
    with db.begin() as session:
        written = service.take_snapshots(session, warehouse=seeded, until=end)
    assert written > 0
    seeded.execute(Query("DELETE FROM events WHERE CAST(received_at AS DATE) = $d", {"d": DAY}))
    after = _series(db, seeded, "events_received", DAY, end, breakdown="source")
    assert after.snapshot_days == [DAY]
    assert _points(after) == _points(before)
    assert after.total == 5
    weekly = _series(db, seeded, "events_received", DAY, end, grain="week")
    assert weekly.total == 5
    assert weekly.snapshot_days == [DAY]


def test_days_with_raw_data_are_read_raw_and_restated_by_the_next_snapshot(
    db: Database, seeded: Warehouse
) -> None:
    end = DAY + timedelta(days=2)
    with db.begin() as session:
        service.take_snapshots(session, warehouse=seeded, until=end)
    load_events(seeded, [("crm", "identify", at(end, 5), [])])
    late = _series(db, seeded, "events_received", end, end)
    assert (late.total, late.snapshot_days) == (2, [])
    with db.begin() as session:
        service.take_snapshots(session, warehouse=seeded, until=end)
    stored = seeded.rows(
        Query(
            "SELECT value FROM kpi_snapshots WHERE metric = 'events_received' "
            "AND breakdown = '' AND day = $d",
            {"d": end},
        )
    )
    assert stored == [(2.0,)]
    first_day = seeded.rows(
        Query(
            "SELECT count(*) FROM kpi_snapshots WHERE metric = 'events_received' AND day = $d",
            {"d": DAY},
        )
    )
    # Day one did not change, so it was not re-stored, and it was not duplicated.
    assert first_day == [(1 + 2 + 2,)]


def _level_metric(
    *, start: date, end: date, grain: str, breakdown: str | None, program_id: str | None
) -> Query:
    """A balance-like level per day and programme, from a VALUES list (a registered extension)."""
    return Query(
        """
        SELECT CAST(date_trunc($grain, d) AS DATE) AS period,
               CASE $breakdown WHEN 'program' THEN p END AS key,
               sum(v) AS value
        FROM (VALUES (DATE '2026-03-02', 'gold', 10), (DATE '2026-03-03', 'gold', 12),
                     (DATE '2026-03-04', 'silver', 5), (DATE '2026-03-10', 'gold', 20)) t(d, p, v)
        WHERE d BETWEEN $start AND $end AND ($program IS NULL OR p = $program)
        GROUP BY 1, 2
        """,
        {"grain": grain, "breakdown": breakdown, "start": start, "end": end, "program": program_id},
    )


def test_registered_level_metric_keeps_the_last_value_per_period(
    db: Database, warehouse: Warehouse
) -> None:
    catalogue = Catalogue()
    level = Metric(
        name="points_liability",
        title="Outstanding points",
        unit="points",
        store="warehouse",
        package="loyalty",
        description="test level",
        build=_level_metric,
        breakdowns=("program",),
        aggregation="last",
        program_scoped=True,
    )
    catalogue.register(level)
    with pytest.raises(ValueError, match="twice"):
        catalogue.register(level)
    with db.begin() as session:  # the programme a scoped series names must exist
        created = utcnow()
        fields = ProgramCreate(name="Gold club").model_dump()
        session.add(Program(id="gold", **fields, created_at=created, updated_at=created))
    with db.begin() as session:
        weekly = service.kpi_series(
            session,
            warehouse=warehouse,
            metric="points_liability",
            start=date(2026, 3, 2),
            end=date(2026, 3, 15),
            grain="week",
            catalogue=catalogue,
        )
        gold = service.kpi_series(
            session,
            warehouse=warehouse,
            metric="points_liability",
            start=date(2026, 3, 2),
            end=date(2026, 3, 15),
            program_id="gold",
            catalogue=catalogue,
        )
    assert _points(weekly) == [(date(2026, 3, 2), None, 5), (date(2026, 3, 9), None, 20)]
    assert weekly.total == 20
    assert [p[2] for p in _points(gold)] == [10, 12, 20]
    assert gold.program_id == "gold"


def _stored(warehouse: Warehouse, metric: str) -> dict[tuple[date, str, str | None], float]:
    rows = warehouse.rows(
        Query(
            "SELECT day, breakdown, key, value FROM kpi_snapshots WHERE metric = $m",
            {"m": metric},
        )
    )
    return {(r[0], r[1], r[2]): r[3] for r in rows}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_snapshot_job_stores_the_event_time_history_and_late_backfills_idempotently(
    db: Database, warehouse: Warehouse
) -> None:
    today = service.today()
    yesterday = today - timedelta(days=1)
    old = [today - timedelta(days=n) for n in (300, 40, 40, 2)]
    # A history imported today: received today, happened long ago (as after `cdp demo`).
    load_events(warehouse, [("crm", "track", at(d), []) for d in old])
    warehouse.execute(Query("UPDATE events SET received_at = $now", {"now": at(today, 0)}))
    with db.begin() as session:
        first = service.take_snapshots(session, warehouse=warehouse)
    stored = _stored(warehouse, "events_occurred")
    expected = {}
    for day in set(old):
        n = float(old.count(day))
        expected.update({(day, "", None): n, (day, "source", "crm"): n})
        expected[(day, "event_type", "track")] = n
    assert stored == expected
    assert _stored(warehouse, "events_received") == {}  # today is not closed
    assert first == len(expected)
    with db.begin() as session:
        assert service.take_snapshots(session, warehouse=warehouse) == 0  # nothing changed
    # The loyalty backfill writes ledger entries dated in the past after the first run.
    program = make_program(db, name="Club")
    member_days = (today - timedelta(days=200), today - timedelta(days=3))
    with db.begin() as session:
        member = Member(program_id=program.id, profile_id="p1", enrolled_at=aware(old[0]))
        session.add(member)
        session.flush()
        for i, day in enumerate(member_days):
            session.add(
                LedgerEntry(
                    program_id=program.id,
                    member_id=member.id,
                    kind="earn",
                    points=10 * (i + 1),
                    occurred_at=aware(day),
                    local_date=day,
                    idempotency_key=f"backfill:{i}",
                )
            )
    with db.begin() as session:
        service.take_snapshots(session, warehouse=warehouse)
    issued: dict[tuple[date, str, str | None], float] = {}
    for i, d in enumerate(member_days):
        issued[(d, "", None)] = issued[(d, "program", program.id)] = 10.0 * (i + 1)
    assert _stored(warehouse, "points_issued") == issued
    # Levels known only now are stored as yesterday's closing value.
    assert _stored(warehouse, "members") == {
        (yesterday, "", None): 1.0,
        (yesterday, "program", program.id): 1.0,
        (yesterday, "status", "active"): 1.0,
    }
    members = _series(db, warehouse, "members", yesterday, today)
    assert (members.snapshot_days, _points(members)) == (
        [yesterday],
        [(yesterday, None, 1), (today, None, 1)],
    )
    with db.begin() as session:
        assert service.take_snapshots(session, warehouse=warehouse) == 0
    # Once the raw events are erased the history stays, served from the snapshots.
    warehouse.execute(Query("DELETE FROM events"))
    with db.begin() as session:
        assert service.take_snapshots(session, warehouse=warehouse) == 0
    assert _stored(warehouse, "events_occurred") == expected
    history = _series(db, warehouse, "events_occurred", old[0], yesterday, grain="month")
    assert history.total == len(old)
    assert history.snapshot_days == sorted(set(old))
