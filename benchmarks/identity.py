"""Identity resolution: full and incremental speed, quality against a ground truth, lookups.

Data: a synthetic multi-key retail graph of `scale` persons (web, app, CRM and till records
keyed by user id, emails, phone, loyalty card and device ids) with realistic noise: typo
emails, placeholder values, shop till emails shared by many customers, family devices shared
by two account holders and anonymous-only browsing. Every event knows its true person.

Figures, each with its reference measured in the same run:
- full resolution of the whole graph vs `scipy.sparse.csgraph.connected_components` on the
  same edge list loaded from the same warehouse (the labelling floor);
- incremental resolution of 10,000 new events into the resolved graph (no reference: the
  budget is 2 s);
- quality: pairwise precision / recall of events per person, over- and under-merged persons;
- profile lookup by identifier through the HTTP API (p50 / p99) vs the bare DuckDB query.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
from fastapi.testclient import TestClient
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from benchmarks.core import Measure, Result, peak_rss_mib, timer
from cdp.app import create_app
from cdp.auth import Role, create_key
from cdp.config import Settings
from cdp.db import Base, Database
from cdp.warehouse import Cursor, Query, Warehouse
from identity import service
from identity.rules import IdentityRules
from migrations.models import load_all_models

logger = logging.getLogger(__name__)

SEED = 7
INCREMENTAL_EVENTS = 10_000
LOOKUPS = 500
T0 = np.datetime64("2026-01-01T00:00:00", "us")


@dataclass(slots=True)
class Synthetic:
    """Events, their identifiers and the true person of each event."""

    events: pl.DataFrame
    identifiers: pl.DataFrame
    truth: pl.DataFrame


def generate(persons: int, *, seed: int, first_person: int = 0, first_event: int = 1) -> Synthetic:
    """A synthetic multi-source history of `persons` people (vectorised, deterministic)."""
    rng = np.random.default_rng(seed + first_person)
    pid = np.arange(first_person, first_person + persons)
    has_user = rng.random(persons) < 0.7
    has_email = rng.random(persons) < 0.85
    has_alt = rng.random(persons) < 0.2
    has_phone = rng.random(persons) < 0.6
    has_card = rng.random(persons) < 0.4
    typo = rng.random(persons) < 0.03
    placeholder = rng.random(persons) < 0.005
    at_till = rng.random(persons) < 0.02
    shares_device = rng.random(persons) < 0.01

    user = np.char.add("u", pid.astype(str))
    email = np.char.add(np.char.add("p", pid.astype(str)), "@mail.com")
    alt = np.char.add(np.char.add("p", pid.astype(str)), ".alt@mail.com")
    bad = np.char.add(np.char.add("p", pid.astype(str)), "@mial.com")
    phone = np.char.add("+3361", np.char.zfill(pid.astype(str), 7))
    card = np.char.add("L", pid.astype(str))
    anon1 = np.char.add(np.char.add("a", pid.astype(str)), "_1")
    anon2 = np.char.add(np.char.add("a", pid.astype(str)), "_2")
    till = np.char.add(np.char.add("store", (pid % 50).astype(str)), "@shop.com")
    # A family tablet: the next person's first device shows up in this person's app sessions.
    neighbour_anon = np.roll(anon1, -1)

    parts: list[tuple[np.ndarray, list[tuple[str, np.ndarray]], str, str]] = []

    def add(mask: np.ndarray, ids: list[tuple[str, np.ndarray]], source: str, kind: str) -> None:
        parts.append((mask, ids, source, kind))

    add(has_user, [("user_id", user), ("email", email), ("anonymous_id", anon1)], "web", "identify")
    add(has_user, [("user_id", user), ("anonymous_id", anon2)], "app", "identify")
    add(
        has_user & shares_device,
        [("user_id", user), ("anonymous_id", neighbour_anon)],
        "app",
        "identify",
    )
    add(~has_user & has_email, [("email", email), ("anonymous_id", anon1)], "web", "identify")
    add(has_email & has_phone, [("email", email), ("phone", phone)], "crm", "identify")
    add(has_email & ~has_phone, [("email", email)], "crm", "identify")
    add(has_alt, [("email", alt), ("phone", phone)], "crm", "identify")
    add(typo & has_phone, [("email", bad), ("phone", phone)], "crm", "identify")
    add(typo & ~has_phone, [("email", bad)], "crm", "identify")
    add(placeholder, [("email", np.full(persons, "unknown")), ("phone", phone)], "crm", "identify")
    add(has_card, [("loyalty_card", card), ("phone", phone)], "pos", "track")
    add(has_card & has_email, [("loyalty_card", card), ("email", email)], "pos", "track")
    add(has_card & at_till, [("loyalty_card", card), ("email", till)], "pos", "track")
    add(np.ones(persons, dtype=bool), [("anonymous_id", anon1)], "web", "track")
    add(np.ones(persons, dtype=bool), [("anonymous_id", anon1)], "web", "track")

    event_frames = []
    ident_frames = []
    offset = 0
    for mask, ids, source, kind in parts:
        idx = np.flatnonzero(mask)
        # Person ids without the identifier (phone for a person without phone) are dropped.
        n = len(idx)
        if n == 0:
            continue
        local = np.arange(offset, offset + n)
        offset += n
        event_frames.append(
            pl.DataFrame({"local": local, "person": pid[idx], "source_id": source, "type": kind})
        )
        for ident_kind, values in ids:
            ident_frames.append(
                pl.DataFrame({"local": local, "kind": ident_kind, "value": values[idx]})
            )
    events = pl.concat(event_frames)
    order = rng.permutation(events.height)
    events = events.with_columns(
        event_id=pl.Series(np.argsort(order) + first_event, dtype=pl.Int64),
    )
    truth = events.select("event_id", "person")
    minutes = np.sort(rng.integers(0, 60 * 24 * 365, events.height))
    ts = T0 + minutes[events["event_id"].to_numpy() - first_event].astype("timedelta64[m]")
    n_events = events.height
    events_out = pl.DataFrame(
        {
            "event_id": events["event_id"],
            "message_id": pl.Series(events["event_id"].cast(pl.String)),
            "source_id": events["source_id"],
            "batch_id": pl.Series(np.ones(n_events, dtype=np.int64)),
            "type": events["type"],
            "event": pl.Series([None] * n_events, dtype=pl.String),
            "user_id": pl.Series([None] * n_events, dtype=pl.String),
            "anonymous_id": pl.Series([None] * n_events, dtype=pl.String),
            "timestamp": pl.Series(ts),
            "received_at": pl.Series(ts),
            "properties": pl.Series([None] * n_events, dtype=pl.String),
            "traits": pl.Series(
                np.char.add(
                    np.char.add('{"n":', (events["person"].to_numpy() % 97).astype(str)), "}"
                )
            ),
            "context": pl.Series([None] * n_events, dtype=pl.String),
        }
    ).sort("event_id")
    identifiers = (
        pl.concat(ident_frames)
        .join(events.select("local", "event_id"), on="local")
        .select("event_id", "kind", "value")
        .sort("event_id")
    )
    return Synthetic(events=events_out, identifiers=identifiers, truth=truth)


def load(warehouse: Warehouse, data: Synthetic) -> None:
    """Append synthetic events and identifiers to the warehouse through Arrow."""
    with warehouse.transaction() as cur:
        cur.register("bench_events", data.events.to_arrow())
        cur.execute("INSERT INTO events SELECT * FROM bench_events")
        cur.unregister("bench_events")
        cur.register("bench_idents", data.identifiers.to_arrow())
        cur.execute("INSERT INTO event_identifiers SELECT * FROM bench_idents")
        cur.unregister("bench_idents")


def generate_into(scale: int, path: Path, memory: str) -> tuple[int, int, float]:
    """Generate `scale` persons into the warehouse at `path` and their truth next to it
    (`<path>.truth.parquet`); returns the events, identifier rows and this process's peak
    RSS in MiB (run in a child process)."""
    data = generate(scale, seed=SEED)
    warehouse = Warehouse(path, memory_limit=memory).open()
    try:
        load(warehouse, data)
    finally:
        warehouse.close()
    data.truth.write_parquet(path.with_suffix(".truth.parquet"))
    return data.events.height, data.identifiers.height, round(peak_rss_mib(), 1)


def scipy_reference(warehouse: Warehouse) -> tuple[float, int]:
    """Seconds to load the edge list from the warehouse and label it with scipy."""
    with timer() as elapsed:
        edges = warehouse.arrow(Query("SELECT src, dst FROM identity_edges"))
        src = edges.column("src").to_numpy()
        dst = edges.column("dst").to_numpy()
        nodes, inverse = np.unique(np.concatenate([src, dst]), return_inverse=True)
        i, j = inverse[: len(src)], inverse[len(src) :]
        graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(len(nodes),) * 2)
        count, _ = connected_components(graph.tocsr(), directed=False)
    return elapsed(), int(count)


def quality(warehouse: Warehouse, truth: pl.DataFrame) -> dict[str, float | int]:
    """Pairwise precision and recall of events grouped by profile vs by true person.

    Scored in DuckDB (the truth is registered, each event's profile is the identity
    relation): no frame of every event's profile id is built in Python.
    """
    with warehouse.cursor() as cur:
        cur.register("bench_truth", truth.select("event_id", "person").to_arrow())
        try:
            cur.execute(
                """
                CREATE OR REPLACE TEMP TABLE bench_scored AS
                WITH ep AS ({profiles})
                SELECT coalesce(ep.profile_id, 'none:' || t.event_id::VARCHAR) AS profile_id,
                       t.person
                FROM bench_truth t LEFT JOIN ep ON ep.event_id = t.event_id
                """.replace("{profiles}", service.event_profile_sql())
            )
            figures = scores_sql(cur, "bench_scored")
            profiles = cur.execute(
                "SELECT count(DISTINCT profile_id) FROM ({profiles})".replace(
                    "{profiles}", service.event_profile_sql()
                )
            ).fetchall()[0][0]
            cur.execute("DROP TABLE bench_scored")
        finally:
            cur.unregister("bench_truth")
    return {**figures, "profiles": int(profiles)}


# Pairwise scores from the contingency table of (profile, person): true pairs are the pairs
# inside a cell, predicted pairs those inside a profile, actual pairs those of a person; each
# is a sum of C(n, 2) over a group-by, so nothing pairwise is ever built.
_SCORES = """
    WITH cells AS (
        SELECT profile_id, person, count(*)::BIGINT AS n FROM {relation} GROUP BY ALL
    ),
    by_profile AS (
        SELECT profile_id, sum(n)::HUGEINT AS n, count(*) AS persons FROM cells GROUP BY ALL
    ),
    by_person AS (SELECT person, sum(n)::HUGEINT AS n, count(*) AS profiles FROM cells GROUP BY ALL)
    SELECT
        (SELECT coalesce(sum(n * (n - 1) // 2), 0) FROM cells)::HUGEINT AS true_pos,
        (SELECT coalesce(sum(n * (n - 1) // 2), 0) FROM by_profile)::HUGEINT AS predicted,
        (SELECT coalesce(sum(n * (n - 1) // 2), 0) FROM by_person)::HUGEINT AS actual,
        (SELECT count(DISTINCT c.person) FROM cells c
         SEMI JOIN by_profile p ON p.profile_id = c.profile_id AND p.persons > 1) AS over,
        (SELECT count(*) FROM by_person WHERE profiles > 1) AS under,
        (SELECT count(*) FROM by_person) AS persons
"""


def scores_sql(cur: Cursor, relation: str) -> dict[str, float | int]:
    """Pairwise precision/recall of `profile_id` against `person` in a DuckDB relation (a
    table name from code), and the over- and under-merged persons."""
    true_pos, predicted, actual, over, under, persons = cur.execute(
        _SCORES.replace("{relation}", relation)
    ).fetchall()[0]
    return {
        "precision": round(int(true_pos) / int(predicted), 5) if predicted else 1.0,
        "recall": round(int(true_pos) / int(actual), 5) if actual else 1.0,
        "over_merged_persons": int(over),
        "under_merged_persons": int(under),
        "persons": int(persons),
    }


def scores(frame: pl.DataFrame) -> dict[str, float | int]:
    """Pairwise precision/recall of `profile_id` against `person` in a frame, and mis-merged
    persons (the same SQL as `scores_sql`, on an in-memory DuckDB)."""
    con = duckdb.connect()
    try:
        con.register("scored_frame", frame.select("profile_id", "person").to_arrow())
        return scores_sql(con, "scored_frame")
    finally:
        con.close()


def lookup_latency(workdir: Path, warehouse: Warehouse, values: list[str]) -> dict[str, float]:
    """p50/p99 of the lookup route through the app, and of the bare DuckDB query."""
    load_all_models()
    db = Database(f"sqlite:///{workdir / 'bench.sqlite3'}")
    Base.metadata.create_all(db.engine)
    with db.begin() as session:
        _, key = create_key(session, name="bench", role=Role.marketer)
    settings = Settings(data_dir=workdir, scheduler={"enabled": False}, log_json=False)
    app = create_app(settings, db=db, warehouse=warehouse, start_scheduler=False)
    api: list[float] = []
    raw: list[float] = []
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {key}"}
        for value in values:
            started = time.perf_counter()
            resp = client.get(
                "/api/profiles/lookup", params={"kind": "email", "value": value}, headers=headers
            )
            api.append(time.perf_counter() - started)
            assert resp.status_code in (200, 404), resp.text
            started = time.perf_counter()
            normalised = value.strip().lower()
            warehouse.rows(
                Query(
                    "SELECT p.* FROM identity_nodes n JOIN profiles p USING (profile_id)"
                    " WHERE n.kind = 'email' AND n.value = $v",
                    {"v": normalised},
                )
            )
            raw.append(time.perf_counter() - started)
    db.dispose()
    return {
        "api_p50_ms": float(np.percentile(api, 50) * 1000),
        "api_p99_ms": float(np.percentile(api, 99) * 1000),
        "duckdb_p50_ms": float(np.percentile(raw, 50) * 1000),
        "duckdb_p99_ms": float(np.percentile(raw, 99) * 1000),
    }


def run(scale: int, workdir: Path) -> Result:
    """Resolve `scale` synthetic persons fully, then 10,000 new events, and measure."""
    rules = IdentityRules()
    settings = Settings(data_dir=workdir)
    result = Result(benchmark="identity", scale=scale)
    # The memory budget is 4 GiB; CDP_BENCH_DUCKDB_MEMORY raises DuckDB's share.
    memory = os.environ.get("CDP_BENCH_DUCKDB_MEMORY", "3GB")
    path = workdir / "identity.duckdb"
    # The generator runs in a child process: its frames are not part of what is measured,
    # and memory Python freed is not always given back, so it would inflate the peak RSS of
    # the process that resolves.
    with timer() as gen_elapsed:
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            n_events, n_identifiers, generator_rss = pool.submit(
                generate_into, scale, path, memory
            ).result()
    truth = pl.read_parquet(path.with_suffix(".truth.parquet"))
    warehouse = Warehouse(path, memory_limit=memory).open()
    try:
        steps = _StepTimes()
        resolver_log = logging.getLogger("identity.resolver")
        level = resolver_log.level
        resolver_log.addHandler(steps)
        resolver_log.setLevel(logging.DEBUG)
        try:
            with timer() as full_elapsed:
                full = service.resolve(warehouse, settings=settings, rules=rules, full=True)
        finally:
            resolver_log.removeHandler(steps)
            resolver_log.setLevel(level)
        scipy_seconds, scipy_components = scipy_reference(warehouse)
        result.add(
            Measure(
                name="full resolution",
                unit="s",
                project=full_elapsed(),
                reference=scipy_seconds,
                reference_name="scipy connected_components on the same edge list",
            )
        )
        result.add(
            Measure(
                name="labelling step inside the full resolution (scipy + rule-aware pass)",
                unit="s",
                project=full.labelling_seconds,
                reference=scipy_seconds,
                reference_name="scipy connected_components on the same edge list",
            )
        )
        figures = quality(warehouse, truth)

        new_persons = max(1, INCREMENTAL_EVENTS // 3)
        # Half returning customers, half new ones.
        fresh = generate(
            new_persons, seed=SEED + 1, first_person=max(0, scale - new_persons // 2), first_event=0
        )
        fresh = _take_events(fresh, INCREMENTAL_EVENTS, first_event=n_events + 1)
        load(warehouse, fresh)
        with timer() as inc_elapsed:
            incremental = service.resolve(warehouse, settings=settings, rules=rules)
        result.add(
            Measure(
                name=f"incremental, {fresh.events.height:,} new events",
                unit="s",
                project=inc_elapsed(),
            )
        )
        rng = np.random.default_rng(SEED)
        sample = rng.choice(scale, size=min(LOOKUPS, scale), replace=False)
        latency = lookup_latency(workdir, warehouse, [f"P{p}@mail.com " for p in sample])
        result.add(
            Measure(
                name="lookup p99 through the API",
                unit="ms",
                project=latency["api_p99_ms"],
                reference=latency["duckdb_p99_ms"],
                reference_name="the bare DuckDB lookup query",
            )
        )
        result.details = {
            "duckdb_memory_limit": memory,
            "events": n_events,
            "identifier_rows": n_identifiers,
            "generate_and_load_s": round(gen_elapsed(), 3),
            "generator_peak_rss_mib": generator_rss,
            "full": full.as_dict(),
            "full_steps_s": steps.slowest(24),
            "scipy_components": scipy_components,
            "incremental": incremental.as_dict(),
            "quality": figures,
            "lookup": {k: round(v, 3) for k, v in latency.items()},
        }
    finally:
        warehouse.close()
    return result


class _StepTimes(logging.Handler):
    """Collects the seconds per step the resolver logs at debug level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        found = getattr(record, "seconds_per_step", None)
        if isinstance(found, dict):
            self.seconds.update(found)

    def slowest(self, count: int) -> dict[str, float]:
        """The `count` slowest steps (named by their first words), slowest first."""
        ranked = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:count]
        return {name: round(seconds, 2) for name, seconds in ranked}


def _take_events(data: Synthetic, count: int, *, first_event: int) -> Synthetic:
    """The first `count` events of a synthetic batch, renumbered after `first_event - 1`."""
    events = data.events.sort("event_id").head(count)
    shift = first_event - int(events["event_id"].to_numpy().min())
    keep = events["event_id"]
    return Synthetic(
        events=events.with_columns(pl.col("event_id") + shift),
        identifiers=data.identifiers.filter(pl.col("event_id").is_in(keep)).with_columns(
            pl.col("event_id") + shift
        ),
        truth=data.truth.filter(pl.col("event_id").is_in(keep)).with_columns(
            pl.col("event_id") + shift
        ),
    )
