"""Loyalty daily jobs and member reads at scale, against one plain SQL aggregate of the ledger.

A programme of `scale` members (bulk-inserted into a SQLite operational store) with about
8.5 earn entries each over two years, one lot per entry (rolling 12-month expiry; the lots
that expired before yesterday already drawn to 0, so tonight's run expires one day's lots),
Silver/Gold/Platinum tiers on qualifying points over 12 months set as they stood 40 days ago
(so tonight some members go up, some fall below, and half of those below have been so past
the 30-day grace), 1% of memberships merged into another, 2% unenrolled, and a birth date
trait on every profile in the DuckDB warehouse. Timed, each in its own transaction as the
scheduler runs them: expiry, tier re-evaluation, birthday bonuses, the member snapshot for
segments, the expiring-soon list, the KPIs; then the member reads (balance with tier
progress, a history page, the tier history) through the real ASGI app for a sample of
members. The reference, measured in the same run: `SELECT member_id, sum(points) FROM
loyalty_ledger_entry GROUP BY member_id` for the jobs, one indexed `sum(remaining)` of a
member's lots for the reads.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
from fastapi.testclient import TestClient
from sqlalchemy import Index, func, select
from sqlalchemy.schema import CreateIndex, DropIndex

from benchmarks.core import Measure, Result, timer
from cdp.app import create_app
from cdp.auth import Role, create_key
from cdp.config import Settings
from cdp.db import Base, Database
from cdp.warehouse import Warehouse
from loyalty import ledger, service, tiers
from loyalty.models import LedgerEntry, Lot, Member, Tier
from loyalty.schemas import Enrolment, ProgramCreate, RuleCreate, TierCreate
from migrations.models import load_all_models

logger = logging.getLogger(__name__)

NOW = datetime(2026, 6, 15, 1, 30, tzinfo=UTC)
DAY = timedelta(days=1)
LADDER = (("Silver", 1, 500.0), ("Gold", 2, 2_000.0), ("Platinum", 3, 5_000.0))
ENTRIES_PER_MEMBER = 8.5
READ_SAMPLE = 200
# NOT INDEXED: otherwise SQLite walks the (member, created) index and fetches every entry at a
# random place, which at 8.5M entries ran for more than 6 minutes; one scan and a sort is the
# plain aggregate this reference means.
REFERENCE_SQL = (
    "SELECT member_id, sum(points) FROM loyalty_ledger_entry NOT INDEXED GROUP BY member_id"
)
READ_REFERENCE_SQL = "SELECT sum(remaining) FROM loyalty_lot WHERE member_id = ?"
SEED = 7


def _indexes() -> list[Index]:
    tables = (LedgerEntry.__table__, Lot.__table__, Member.__table__)
    return [index for table in tables for index in table.indexes]  # type: ignore[attr-defined]


def _padded(prefix: str, values: pl.Expr) -> pl.Expr:
    return pl.lit(prefix) + values.cast(pl.String).str.zfill(9)


def _members(program_id: str, scale: int) -> pl.DataFrame:
    """Members in id order: 1% merged into the member before them, 2% unenrolled."""
    i = pl.int_range(0, scale, eager=True).alias("i")
    frame = pl.DataFrame(i)
    merged = (pl.col("i") % 100 == 99) & (pl.col("i") > 0)
    enrolled = pl.lit(NOW - 1000 * DAY) + pl.duration(days=(pl.col("i") * 7_919) % 900)
    return frame.select(
        _padded("m", pl.col("i")).alias("id"),
        pl.lit(program_id).alias("program_id"),
        _padded("p", pl.col("i")).alias("profile_id"),
        pl.when(merged)
        .then(pl.lit("merged"))
        .when(pl.col("i") % 100 >= 97)
        .then(pl.lit("unenrolled"))
        .otherwise(pl.lit("active"))
        .alias("status"),
        enrolled.alias("enrolled_at"),
        enrolled.alias("status_changed_at"),
        pl.when(merged).then(_padded("m", pl.col("i") - 1)).alias("merged_into"),
        pl.lit(0).alias("lock_seq"),
    )


def _credits(program_id: str, members: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Earn entries (about 8.5 a member over two years, in time order) and their lots (owned
    by the survivor for a merged membership; expired before yesterday: drawn to 0)."""
    rng = np.random.default_rng(SEED)
    owner = np.repeat(np.arange(members.height), rng.poisson(ENTRIES_PER_MEMBER, members.height))
    ages = (rng.random(owner.size) * 730 * 86_400e6).astype(np.int64)
    frame = (
        pl.DataFrame(
            {
                "member_id": members["id"].gather(owner),
                "holder": members.select(pl.coalesce("merged_into", "id"))
                .to_series()
                .gather(owner),
                "points": rng.integers(5, 200, owner.size),
                "age": ages,
            }
        )
        .with_columns((pl.lit(NOW) - pl.duration(microseconds=pl.col("age"))).alias("occurred_at"))
        .sort("occurred_at")
        .with_row_index("n")
        .with_columns(
            _padded("e", pl.col("n")).alias("id"),
            (pl.col("occurred_at") + pl.duration(days=365)).alias("expires_at"),
        )
    )
    entries = frame.select(
        "id",
        pl.lit(program_id).alias("program_id"),
        "member_id",
        pl.lit("earn").alias("kind"),
        "points",
        pl.col("points").alias("qualifying_points"),
        pl.lit(0).alias("unrecovered"),
        pl.lit("active").alias("status"),
        "expires_at",
        "occurred_at",
        pl.col("occurred_at").dt.date().alias("local_date"),
        pl.col("occurred_at").alias("created_at"),
        _padded("seed:", pl.col("n")).alias("idempotency_key"),
    )
    lots = frame.select(
        pl.col("id").alias("entry_id"),
        pl.lit(program_id).alias("program_id"),
        pl.col("holder").alias("member_id"),
        "points",
        pl.when(pl.col("expires_at") <= NOW - DAY)
        .then(0)
        .otherwise(pl.col("points"))
        .alias("remaining"),
        pl.col("occurred_at").alias("earned_at"),
        "expires_at",
    )
    return entries, lots


def _tiers_40_days_ago(
    members: pl.DataFrame, entries: pl.DataFrame, ladder: list[Tier], start: datetime
) -> pl.DataFrame:
    """Each member's tier as the metric gave it 40 days ago; of those below it now, half
    have been below for 31 days (past the grace) and half are not marked yet."""
    then = NOW - 40 * DAY
    owners = members.select("id", pl.coalesce("merged_into", "id").alias("owner"))

    def metric(since: datetime, until: datetime, name: str) -> pl.DataFrame:
        window = entries.filter(pl.col("occurred_at").is_between(since, until))
        return (
            window.join(owners, left_on="member_id", right_on="id")
            .group_by("owner")
            .agg(pl.col("qualifying_points").sum().alias(name))
        )

    def rank(column: str) -> pl.Expr:
        out: pl.Expr = pl.lit(0)
        for tier in ladder:
            out = pl.when(pl.col(column) >= tier.threshold).then(tier.rank).otherwise(out)
        return out

    by_rank = {t.rank: t.id for t in ladder}
    return (
        members.select("id")
        .join(metric(start - 40 * DAY, then, "then"), left_on="id", right_on="owner", how="left")
        .join(metric(start, NOW, "now"), left_on="id", right_on="owner", how="left")
        .fill_null(0)
        .with_columns(rank("then").alias("held"), rank("now").alias("reached"))
        .select(
            "id",
            pl.col("held")
            .replace_strict(by_rank, default=None, return_dtype=pl.String)
            .alias("tier_id"),
            pl.when(pl.col("held") > 0).then(pl.lit(then)).alias("tier_since"),
            pl.when((pl.col("reached") < pl.col("held")) & (pl.col("id").str.tail(1) < "5"))
            .then(pl.lit(NOW - 31 * DAY))
            .alias("below_tier_since"),
        )
    )


def build(
    db: Database, warehouse: Warehouse | None, scale: int, *, enrolment: Enrolment = "explicit"
) -> dict[str, object]:
    """The programme, its members, ledger and lots, and (given a warehouse) the profiles'
    birth dates."""
    with db.begin() as session:
        program = service.create_program(
            session,
            data=ProgramCreate(
                name="Big club",
                status="active",
                enrolment=enrolment,
                timezone="Europe/Paris",
                expiry_policy="rolling",
                expiry_months=12,
                tier_grace_days=30,
            ),
        )
        ladder = [
            service.create_tier(
                session,
                program_id=program.id,
                data=TierCreate(name=name, rank=rank, threshold=threshold),
            )
            for name, rank, threshold in LADDER
        ]
        service.create_rule(
            session,
            program_id=program.id,
            data=RuleCreate(
                name="birthday", event_name="Birthday", formula={"type": "fixed", "points": 100}
            ),
        )
        program_id = program.id
        start = tiers.window_start(program, NOW)
    members = _members(program_id, scale)
    entries, lots = _credits(program_id, members)
    members = members.join(_tiers_40_days_ago(members, entries, ladder, start), on="id")
    with db.begin() as session:
        connection = session.connection()
        for index in _indexes():
            connection.execute(DropIndex(index))
        for table, frame in (
            (Member.__table__, members),
            (LedgerEntry.__table__, entries),
            (Lot.__table__, lots),
        ):
            ledger.bulk_insert(session, table, frame)
        for index in _indexes():
            connection.execute(CreateIndex(index))
    with db.engine.connect() as connection:
        connection.exec_driver_sql("ANALYZE")
    built: dict[str, object] = {
        "program_id": program_id,
        "members": members.height,
        "ledger entries": entries.height,
        "lots": lots.height,
        "members holding a tier (40 days ago)": members["tier_id"].is_not_null().sum(),
    }
    if warehouse is None:
        return built
    day = pl.int_range(0, scale, eager=True) * 7_727 % 20_000
    profiles = pl.DataFrame({"profile_id": members["profile_id"], "day": day}).select(
        "profile_id",
        pl.lit(NOW.replace(tzinfo=None)).alias("created_at"),
        pl.lit(NOW.replace(tzinfo=None)).alias("updated_at"),
        pl.lit(0).alias("event_count"),
        pl.lit("[]").alias("identifiers"),
        (
            pl.lit('{"birth_date": "')
            + (pl.lit(datetime(1950, 1, 1).date()) + pl.duration(days=pl.col("day"))).dt.to_string(
                "%Y-%m-%d"
            )
            + pl.lit('"}')
        ).alias("traits"),
    )
    with warehouse.transaction() as cur:
        cur.register("profile_frame", profiles)
        cur.execute("INSERT INTO profiles BY NAME SELECT * FROM profile_frame")
        cur.unregister("profile_frame")
    return built


def _timed(result: Result, name: str, reference: float, job: object) -> object:
    """Run a job in its own transaction (as the scheduler does) and record its time."""
    assert callable(job)
    with timer() as elapsed:
        value = job()
    result.add(Measure(name, "s", elapsed(), reference, "GROUP BY member_id over the ledger"))
    return value


def _reference(db: Database) -> float:
    """One plain aggregate over the whole ledger, fetched."""
    with db.engine.connect() as connection, timer() as elapsed:
        rows = connection.exec_driver_sql(REFERENCE_SQL).fetchall()
    logger.debug("reference: %d members", len(rows))
    return elapsed()


def _reads(db: Database, client: TestClient, headers: dict[str, str], result: Result) -> None:
    """Mean latency of each member read through the app against one indexed lot sum."""
    with db.begin() as session:
        active = session.scalars(
            select(Member.id).where(Member.status == "active").order_by(Member.id)
        ).all()
    step = max(len(active) // READ_SAMPLE, 1)
    sample = list(active[::step][:READ_SAMPLE])
    raw = db.engine.raw_connection()
    try:
        cursor = raw.cursor()
        for member_id in sample[:10]:  # warm the caches as the app's requests will be
            cursor.execute(READ_REFERENCE_SQL, (member_id,)).fetchall()
        start = time.perf_counter()
        for member_id in sample:
            cursor.execute(READ_REFERENCE_SQL, (member_id,)).fetchall()
        reference = (time.perf_counter() - start) / len(sample) * 1000
    finally:
        raw.close()
    for name, path in (
        ("balance with tier progress", "/api/loyalty/members/{}/balance"),
        ("history page (20 entries)", "/api/loyalty/members/{}/history?limit=20"),
        ("tier history", "/api/loyalty/members/{}/tiers"),
    ):
        for member_id in sample[:10]:
            client.get(path.format(member_id), headers=headers)
        start = time.perf_counter()
        for member_id in sample:
            answer = client.get(path.format(member_id), headers=headers)
            if answer.status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text}")
        mean = (time.perf_counter() - start) / len(sample) * 1000
        result.add(Measure(f"read: {name}", "ms", mean, reference, "indexed lot sum (SQL)"))


def run(scale: int, workdir: Path) -> Result:
    """Build a programme of `scale` members, run each daily job once and time the reads."""
    load_all_models()
    result = Result("loyalty_jobs", scale)
    url = f"sqlite:///{workdir / 'operational.sqlite3'}"
    (workdir / "operational.sqlite3").unlink(missing_ok=True)
    (workdir / "warehouse.duckdb").unlink(missing_ok=True)
    db = Database(url)
    Base.metadata.create_all(db.engine)
    settings = Settings(
        data_dir=workdir,
        database_url=url,
        warehouse_path=workdir / "warehouse.duckdb",
        log_json=False,
        scheduler={"enabled": False},
    )
    warehouse = Warehouse(workdir / "warehouse.duckdb").open()
    try:
        with timer() as build_time:
            built = build(db, warehouse, scale)
        program_id = str(built.pop("program_id"))
        result.details.update(built)
        result.details["build s"] = round(build_time(), 1)
        reference = _reference(db)
        result.details["reference (GROUP BY member_id) s"] = round(reference, 3)

        def expire() -> int:
            with db.begin() as session:
                return service.expire_points(session, program_id=program_id, now=NOW)

        def reevaluate() -> list[tiers.Move]:
            with db.begin() as session:
                return service.reevaluate_tiers(session, program_id=program_id, now=NOW)

        def birthdays() -> int:
            with db.begin() as session:
                return service.award_birthdays(
                    session, warehouse, program_id=program_id, now=NOW
                ).credits

        def snapshot() -> int:
            with db.begin() as session:
                return service.publish_member_snapshot(session, warehouse, now=NOW)

        def expiring() -> int:
            with db.begin() as session:
                return len(service.expiring_soon(session, program_id=program_id, now=NOW))

        def kpis() -> int:
            with db.begin() as session:
                return service.kpis(session, warehouse, program_id=program_id, now=NOW).members

        result.details["lots expired"] = _timed(result, "job: expire points", reference, expire)
        moves = _timed(result, "job: re-evaluate tiers", reference, reevaluate)
        assert isinstance(moves, list)
        for reason in ("upgrade", "downgrade"):
            result.details[f"tier {reason}s"] = sum(m.reason == reason for m in moves)
        with db.begin() as session:
            result.details["members marked below their tier"] = session.scalar(
                select(func.count()).where(Member.below_tier_since == NOW)
            )
        result.details["birthday credits"] = _timed(
            result, "job: birthday bonus", reference, birthdays
        )
        result.details["snapshot rows"] = _timed(
            result, "job: publish member snapshot", reference, snapshot
        )
        result.details["members with points expiring in 30 days"] = _timed(
            result, "expiring soon (30 days)", reference, expiring
        )
        result.details["KPI members"] = _timed(result, "programme KPIs", reference, kpis)
        app = create_app(settings, db=db, warehouse=warehouse, start_scheduler=False)
        with db.begin() as session:
            _, key = create_key(session, name="bench", role=Role.loyalty)
        with TestClient(app) as client:
            _reads(db, client, {"Authorization": f"Bearer {key}"}, result)
    finally:
        warehouse.close()
        db.dispose()
    return result
