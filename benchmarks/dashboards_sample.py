"""Every standard dashboard on a generated sample: request to last chart data served.

The stores come from `benchmarks.sample_warehouse` (the sample loaded through the connectors,
identity resolved), copied into the work folder. Two things the sample does not bring are
seeded set-based, so that every widget has data:

* a loyalty ledger: the demo programme (tiers, rewards) launched a year before the end of the
  history; 60% of the buying profiles (by a hash of the profile id) are members, enrolled at
  their first order of that year; one `earn` entry per member order (1 point per euro),
  tier upgrades when the running points cross the tier thresholds, a `5 EUR voucher`
  redemption (and its `redeem` entry) for every member past 500 points, one lot per member
  holding the balance. Written with plain `executemany` into the SQLite store;
* three saved segments with a daily refresh history over the last 90 days (members chosen by
  hashes of the profile ids, with churn), written to the tables segments publishes.

Then the real app runs in-process, and each standard page (Data health, Programme with and
without a programme chosen, Audiences with two segments) is timed from the page request to
the last widget's data, as the browser makes the requests, over the 90 days ending at the
last day of the history. The reference is the same widgets' SQL statements run directly on
their stores (no HTTP, no Polars post-processing), in the same run.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from sqlalchemy import text

from benchmarks import sample_warehouse
from benchmarks.core import Measure, Result
from cdp import migrate
from cdp.db import Database, new_id
from cdp.warehouse import Query, Warehouse
from dashboards import order_facts
from dashboards.metrics import catalogue
from dashboards.standard import BY_SLUG

logger = logging.getLogger(__name__)

DEFAULT_SAMPLES = {1_000_000: ("/work/sample-1m", "/work/bench-1m")}
RANGE_DAYS = 90
ROUNDS = 3
MEMBER_SHARE = 6  # in 10
PAGES = ("data-health", "programme", "audiences")

_ORDERS_SQL = """
WITH orders AS (
    SELECT event_id AS event_id, timestamp AS at,
           coalesce(TRY_CAST(json_extract_string(properties, '$.total') AS DOUBLE),
                    TRY_CAST(json_extract_string(properties, '$.revenue') AS DOUBLE), 0) AS amount
    FROM events
    WHERE event = 'Order Completed' AND timestamp >= $since
),
scoped_events AS (SELECT event_id FROM orders)
SELECT ep.profile_id, o.event_id, o.at, o.amount
FROM orders o
JOIN (
    SELECT ei.event_id, arg_min(n.profile_id, (n.rank::HUGEINT << 60) + n.node_id) AS profile_id
    FROM identity_event_nodes ei JOIN identity_nodes n ON n.node_id = ei.node_id
    WHERE n.profile_id IS NOT NULL AND ei.event_id IN (SELECT event_id FROM scoped_events)
    GROUP BY ei.event_id
) ep ON ep.event_id = o.event_id
WHERE hash(ep.profile_id) % 10 < $share
ORDER BY ep.profile_id, o.at, o.event_id
"""


def _insert(db: Database, table: str, frame: pl.DataFrame) -> None:
    """Bulk insert a frame's rows (columns named as the table's) with one executemany."""
    if frame.is_empty():
        return
    columns = frame.columns
    marks = ", ".join(f":{c}" for c in columns)
    sql = text(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})")  # noqa: S608 - benchmark code, names are constants
    with db.begin() as session:
        session.execute(sql, frame.to_dicts())


def _iso(column: str) -> pl.Expr:
    """Timestamps as the ISO text SQLAlchemy's UtcDateTime stores on SQLite."""
    return pl.col(column).dt.strftime("%Y-%m-%d %H:%M:%S.%6f").alias(column)


def seed_ledger(db: Database, warehouse: Warehouse, *, history_end: datetime) -> dict[str, int]:
    """The demo programme and a year of its ledger, set-based (see the module docstring)."""
    from loyalty import service as loyalty_service

    launch = history_end - timedelta(days=365)
    with db.begin() as session:
        program = loyalty_service.create_demo_program(session, timezone="UTC")
        program_id = program.id
        tiers = {
            t.name: (t.id, t.threshold)
            for t in loyalty_service.list_tiers(session, program_id=program_id)
        }
        rewards, _ = loyalty_service.list_rewards(
            session, program_id=program_id, limit=10, offset=0
        )
        voucher = next(r for r in rewards if r.name == "5 EUR voucher")
        voucher_id, voucher_cost = voucher.id, voucher.points_cost
    orders = warehouse.run(
        Query(_ORDERS_SQL, {"since": launch.replace(tzinfo=None), "share": MEMBER_SHARE})
    ).with_columns(pl.col("amount").floor().cast(pl.Int64).alias("points"))
    members = orders.group_by("profile_id").agg(
        pl.col("at").min().alias("enrolled_at"), pl.col("points").sum().alias("total")
    )
    members = members.with_columns(
        pl.Series("id", [new_id() for _ in range(members.height)], dtype=pl.String)
    )
    orders = orders.join(
        members.select("profile_id", pl.col("id").alias("member_id")), on="profile_id"
    )
    ladder = sorted(tiers.items(), key=lambda t: t[1][1])
    running = orders.sort("member_id", "at", "event_id").with_columns(
        pl.col("points").cum_sum().over("member_id").alias("running")
    )
    changes = []
    previous: str | None = None
    for _, (tier_id, threshold) in ladder:
        crossed = (
            running.filter(pl.col("running") >= threshold)
            .group_by("member_id")
            .agg(pl.col("at").min())
            .with_columns(
                pl.lit(previous).cast(pl.String).alias("from_tier_id"),
                pl.lit(tier_id).alias("to_tier_id"),
            )
        )
        changes.append(crossed)
        previous = tier_id
    tier_changes = pl.concat(changes).with_columns(
        pl.Series("id", [new_id() for _ in range(sum(c.height for c in changes))]),
        pl.lit(program_id).alias("program_id"),
        pl.lit("evaluation").alias("reason"),
        pl.lit(0.0).alias("metric_value"),
    )
    final_tier = (
        tier_changes.sort("at")
        .group_by("member_id")
        .agg(pl.col("to_tier_id").last().alias("tier_id"), pl.col("at").last().alias("tier_since"))
    )
    redeemers = (
        running.filter(pl.col("running") >= voucher_cost)
        .group_by("member_id")
        .agg((pl.col("at").min() + pl.duration(hours=1)).alias("at"))
    )
    redemption_ids = [new_id() for _ in range(redeemers.height)]
    redeem_entry_ids = [new_id() for _ in range(redeemers.height)]
    members = members.join(final_tier, left_on="id", right_on="member_id", how="left").join(
        redeemers.select("member_id", pl.lit(voucher_cost).alias("spent")),
        left_on="id",
        right_on="member_id",
        how="left",
    )
    _insert(
        db,
        "loyalty_member",
        members.select(
            "id",
            pl.lit(program_id).alias("program_id"),
            "profile_id",
            pl.lit("active").alias("status"),
            _iso("enrolled_at"),
            _iso("enrolled_at").alias("status_changed_at"),
            "tier_id",
            _iso("tier_since"),
            pl.lit(0).alias("lock_seq"),
        ),
    )
    earn_ids = [new_id() for _ in range(orders.height)]
    entries = pl.concat(
        [
            orders.select(
                pl.Series("id", earn_ids),
                pl.lit(program_id).alias("program_id"),
                "member_id",
                pl.lit("earn").alias("kind"),
                "points",
                pl.col("points").alias("qualifying_points"),
                _iso("at").alias("occurred_at"),
                pl.col("at").dt.date().alias("local_date"),
                _iso("at").alias("created_at"),
                pl.col("event_id").alias("event_id"),
                pl.format("bench:event:{}", pl.col("event_id")).alias("idempotency_key"),
                pl.lit(None, dtype=pl.String).alias("redemption_id"),
            ),
            redeemers.select(
                pl.Series("id", redeem_entry_ids),
                pl.lit(program_id).alias("program_id"),
                "member_id",
                pl.lit("redeem").alias("kind"),
                pl.lit(-voucher_cost, dtype=pl.Int64).alias("points"),
                pl.lit(0, dtype=pl.Int64).alias("qualifying_points"),
                _iso("at").alias("occurred_at"),
                pl.col("at").dt.date().alias("local_date"),
                _iso("at").alias("created_at"),
                pl.lit(None, dtype=pl.Int64).alias("event_id"),
                pl.Series("idempotency_key", [f"bench:redeem:{i}" for i in redemption_ids]),
                pl.Series("redemption_id", redemption_ids),
            ),
        ]
    ).with_columns(
        pl.lit(0).alias("unrecovered"),
        pl.lit("active").alias("status"),
        pl.col("local_date").cast(pl.String),
    )
    _insert(db, "loyalty_ledger_entry", entries)
    _insert(
        db,
        "loyalty_redemption",
        redeemers.select(
            pl.Series("id", redemption_ids),
            pl.lit(program_id).alias("program_id"),
            "member_id",
            pl.lit(voucher_id).alias("reward_id"),
            pl.lit(voucher_cost).alias("points"),
            pl.Series("coupon_code", [f"B{i[:30]}" for i in redemption_ids]),
            pl.lit("issued").alias("status"),
            pl.Series("entry_id", redeem_entry_ids),
            _iso("at").alias("created_at"),
        ),
    )
    _insert(
        db,
        "loyalty_tier_change",
        tier_changes.select(
            "id",
            "program_id",
            "member_id",
            "from_tier_id",
            "to_tier_id",
            "reason",
            "metric_value",
            _iso("at"),
            _iso("at").alias("recorded_at"),
        ),
    )
    # One lot per member holding the balance (earned minus redeemed), from its first entry.
    first_entry = (
        pl.DataFrame({"id": earn_ids, "member_id": orders["member_id"]})
        .group_by("member_id", maintain_order=True)
        .agg(pl.col("id").first().alias("entry_id"))
    )
    lots = members.join(first_entry, left_on="id", right_on="member_id").select(
        "entry_id",
        pl.lit(program_id).alias("program_id"),
        pl.col("id").alias("member_id"),
        pl.col("total").alias("points"),
        (pl.col("total") - pl.col("spent").fill_null(0)).alias("remaining"),
        _iso("enrolled_at").alias("earned_at"),
    )
    _insert(db, "loyalty_lot", lots)
    with db.begin() as session:
        session.execute(text("ANALYZE"))
    with db.begin() as session:
        loyalty_service.publish_member_snapshot(session, warehouse)
    return {
        "members": members.height,
        "ledger_entries": entries.height,
        "redemptions": redeemers.height,
        "tier_changes": tier_changes.height,
        "program": 1,
    }


_SEGMENT_DAYS_SQL = """
WITH days AS (
    SELECT CAST(d AS DATE) AS day, row_number() OVER (ORDER BY d) AS n
    FROM generate_series(CAST($first AS DATE), CAST($last AS DATE), INTERVAL 1 DAY) AS t(d)
),
people AS (
    SELECT profile_id, hash(profile_id) // 4 AS h FROM profiles WHERE hash(profile_id) % 4 = 0
),
daily AS (
    SELECT s.segment_id, d.day, d.n, p.profile_id
    FROM days d, (VALUES ('S0', 3), ('S1', 5), ('S2', 7)) AS s(segment_id, modulus), people p
    WHERE (p.h + (d.n // 7) * (p.h % 13)) % (s.modulus * 10) < 10
),
marked AS (
    SELECT segment_id, profile_id, day, n,
           lag(n) OVER (PARTITION BY segment_id, profile_id ORDER BY n) AS prev_n
    FROM daily
)
SELECT segment_id, profile_id, day, n, prev_n FROM marked
"""


def seed_segments(db: Database, warehouse: Warehouse, *, last: date) -> dict[str, Any]:
    """Three saved segments and 90 days of daily refreshes of them (published tables only)."""
    from segments.models import SegmentsSegment

    first = last - timedelta(days=RANGE_DAYS - 1)
    ids: dict[str, str] = {}
    with db.begin() as session:
        for i, name in enumerate(("Regular buyers", "Newsletter readers", "App users")):
            row = SegmentsSegment(name=name, rule={"field": "event_count", "op": "gt", "value": i})
            session.add(row)
            session.flush()
            ids[f"S{i}"] = row.id
    mapping = pl.DataFrame({"code": list(ids), "segment_id": list(ids.values())})
    with warehouse.transaction() as cur:
        cur.register("seg_ids", mapping.to_arrow())
        cur.execute(
            f"""
            CREATE TEMP TABLE seg_days AS
            SELECT m.segment_id, x.profile_id, x.day, x.n, x.prev_n
            FROM ({_SEGMENT_DAYS_SQL}) x JOIN seg_ids m ON m.code = x.segment_id
            """,  # noqa: S608 - benchmark code, the SQL is a constant
            {"first": first, "last": last},
        )
        # Entries: present today, absent the day before; exits: present, absent the next day.
        cur.execute(
            """
            INSERT INTO segment_events
            SELECT row_number() OVER (ORDER BY occurred_at, segment_id, profile_id) AS seq,
                   segment_id, profile_id, kind, occurred_at, 1, 1
            FROM (
                SELECT segment_id, profile_id, 'entry' AS kind,
                       CAST(day AS TIMESTAMP) + INTERVAL 2 HOUR AS occurred_at
                FROM seg_days WHERE prev_n IS NULL OR prev_n < n - 1
                UNION ALL
                SELECT segment_id, profile_id, 'exit',
                       CAST(day AS TIMESTAMP) + INTERVAL 26 HOUR
                FROM (
                    SELECT *, lead(n) OVER (PARTITION BY segment_id, profile_id ORDER BY n)
                      AS next_n
                    FROM seg_days
                ) WHERE (next_n IS NULL OR next_n > n + 1) AND day < $last
            )
            """,
            {"last": last},
        )
        cur.execute(
            """
            INSERT INTO segment_refreshes
                (refresh_id, segment_id, segment_version, refreshed_at, size, entries, exits)
            SELECT row_number() OVER (ORDER BY day, segment_id), segment_id, 1,
                   CAST(day AS TIMESTAMP) + INTERVAL 2 HOUR, size, entries, exits
            FROM (
                SELECT s.segment_id, s.day, count(*) AS size,
                       count(*) FILTER (WHERE s.prev_n IS NULL OR s.prev_n < s.n - 1) AS entries,
                       coalesce(max(x.exits), 0) AS exits
                FROM seg_days s
                LEFT JOIN (
                    SELECT segment_id, CAST(occurred_at - INTERVAL 2 HOUR AS DATE) AS day,
                           count(*) AS exits
                    FROM segment_events WHERE kind = 'exit' GROUP BY ALL
                ) x ON x.segment_id = s.segment_id AND x.day = s.day
                GROUP BY ALL
            )
            """
        )
        cur.execute(
            """
            INSERT INTO segment_membership
            SELECT segment_id, profile_id, CAST(day AS TIMESTAMP) FROM seg_days WHERE day = $last
            """,
            {"last": last},
        )
        cur.unregister("seg_ids")
        events = cur.execute("SELECT count(*) FROM segment_events").fetchone()
    return {"segments": len(ids), "segment_events": int(events[0]) if events else 0}


def _statements_time(
    db: Database, warehouse: Warehouse, urls: list[str], *, start: date, end: date
) -> float:
    """The widgets' own statements, run directly on their stores (the reference)."""
    from dashboards.service import run_metric

    began = time.perf_counter()
    for url in urls:
        metric_name = url.split("/kpis/")[1].split("?")[0]
        metric = catalogue().find(metric_name)
        assert metric is not None
        params = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))
        pair = (params["segment_a"], params["segment_b"]) if "segment_a" in params else None
        grain = params.get("grain", "day") if metric.aggregation == "distinct" else "day"
        with db.begin() as session:
            run_metric(
                session,
                warehouse=warehouse,
                metric=metric,
                start=start,
                end=end,
                grain=grain,  # type: ignore[arg-type]
                breakdown=params.get("breakdown"),  # type: ignore[arg-type]
                program_id=params.get("program_id"),
                segments=pair,
            )
    return time.perf_counter() - began


def run(scale: int, workdir: Path) -> Result:
    """Time every standard dashboard on the prepared sample of `scale` customers."""
    from fastapi.testclient import TestClient

    from cdp.app import create_app
    from cdp.auth import Role, create_key

    result = Result(benchmark="dashboards_sample", scale=scale)
    started = time.perf_counter()
    sample_default, prepared_default = DEFAULT_SAMPLES.get(
        scale, (str(workdir / "sample"), str(workdir / "prepared"))
    )
    sample = Path(os.environ.get("CDP_BENCH_SAMPLE", sample_default))
    prepared_dir = Path(os.environ.get("CDP_BENCH_PREPARED", prepared_default))
    if not sample.joinpath("manifest.json").is_file():
        from cdp.sample_data import generate

        generate(customers=scale, seed=42, out=sample)
    prepared = sample_warehouse.ensure(sample, prepared_dir).copy_to(workdir / "stores")
    result.details["copy_seconds"] = round(time.perf_counter() - started, 1)
    settings = prepared.settings(memory_limit="3GB").model_copy(update={"log_json": False})
    settings.scheduler.enabled = False
    migrate.upgrade(settings.db_url)  # the prepared stores may predate the latest revision
    db = Database.from_settings(settings)
    warehouse = Warehouse(settings.warehouse_file, memory_limit="3GB").open()
    history_end = warehouse.scalar(Query("SELECT max(timestamp) FROM events"))
    assert isinstance(history_end, datetime)
    last = history_end.date()
    start = last - timedelta(days=RANGE_DAYS - 1)
    started = time.perf_counter()
    result.details.update(seed_ledger(db, warehouse, history_end=history_end.replace(tzinfo=UTC)))
    result.details["seed_ledger_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    result.details.update(seed_segments(db, warehouse, last=last))
    result.details["seed_segments_seconds"] = round(time.perf_counter() - started, 1)
    # What the `dashboards.order_facts` job keeps up to date: the orders' amounts parsed once.
    started = time.perf_counter()
    result.details["order_facts_rows"] = order_facts.refresh(warehouse)
    result.details["order_facts_seconds"] = round(time.perf_counter() - started, 1)
    with db.begin() as session:
        _, key = create_key(session, name="bench", role=Role.viewer)
        from loyalty import service as loyalty_service

        [program], _ = loyalty_service.list_programs(session, limit=1, offset=0)
        program_id = program.id
    app = create_app(settings, db=db, warehouse=warehouse, start_scheduler=False)
    pages = [
        ("data-health", f"from={start}&to={last}"),
        ("programme", f"from={start}&to={last}"),
        ("programme", f"from={start}&to={last}&program_id={program_id}"),
        ("audiences", f"from={start}&to={last}"),
    ]
    with TestClient(app, base_url="https://testserver") as client:
        signed = client.post("/dashboards/sign-in", data={"api_key": key}, follow_redirects=False)
        assert signed.status_code == 303, signed.text
        for slug, query in pages:
            times: list[float] = []
            urls: list[str] = []
            widget_times: dict[str, list[float]] = {}
            for _ in range(ROUNDS + 1):
                t0 = time.perf_counter()
                page = client.get(f"/dashboards/{slug}?{query}")
                assert page.status_code == 200
                urls = [
                    u.replace("\\u0026", "&")
                    for u in re.findall(r'"dataUrl": "([^"]+)"', page.text)
                ]
                for url in urls:
                    t1 = time.perf_counter()
                    answer = client.get(url)
                    assert answer.status_code == 200, answer.text
                    metric_name = url.split("/kpis/")[1].split("?")[0]
                    widget_times.setdefault(metric_name, []).append(time.perf_counter() - t1)
                times.append(time.perf_counter() - t0)
            assert len(urls) == len(BY_SLUG[slug].widgets), (slug, len(urls))
            reference = statistics.median(
                _statements_time(db, warehouse, urls, start=start, end=last) for _ in range(ROUNDS)
            )
            label = slug + (" (programme chosen)" if "program_id" in query else "")
            slowest = sorted(
                ((statistics.median(ts[1:]), name) for name, ts in widget_times.items()),
                reverse=True,
            )[:4]
            result.details[f"slowest widgets, {label}"] = {
                name: round(seconds, 3) for seconds, name in slowest
            }
            result.add(
                Measure(
                    name=f"{label}: request to last chart data ({len(urls)} widgets)",
                    unit="s",
                    project=statistics.median(times[1:]),
                    reference=reference,
                    reference_name="the widgets' SQL statements alone",
                )
            )
    warehouse.close()
    db.dispose()
    result.details["range"] = f"{start}..{last}"
    result.details["rounds"] = ROUNDS
    result.details["events"] = prepared.events
    result.details["profiles"] = prepared.profiles
    return result
