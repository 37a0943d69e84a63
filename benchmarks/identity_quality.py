"""Identity resolution quality on the generated sample data set, scored against its ground truth.

The sample (`cdp.sample_data`) is loaded through the platform's own connectors, exactly as
`cdp demo` loads it: the CRM CSV and the prepared till file through the file connector, and
the web NDJSON (Segment messages) through the file connector into the http source. Identity
resolution then runs with the default rules, and the profiles are compared with
`ground_truth/record_person.parquet`, which only this benchmark reads:

- a warehouse event maps to a ground-truth record `(source, record_key)` by its source and
  its key: the till transaction id and the web `messageId` are the events' `message_id`;
  a CRM row's key is its `customer_id`, the event's `user_id` identifier;
- pairwise precision / recall of records grouped by profile against records grouped by
  person (an event without a profile counts as a profile of its own), and the persons split
  over several profiles (under-merged) or sharing a profile with another person
  (over-merged).

`--scale` picks the sample: `/work/sample-<N>` style folders are found through
`CDP_SAMPLE_DIR` (default `/work/sample-20k` for 20,000 and `/work/sample-1m` for 1,000,000);
any other scale, or a missing folder, generates the sample (seed 42) into the work directory.
`CDP_BENCH_PREPARED=/work/bench-1m` starts from a copy of the stores
`benchmarks.sample_warehouse` loaded from the sample instead of loading it again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import polars as pl

from benchmarks import sample_warehouse
from benchmarks.core import Measure, Result
from benchmarks.identity import scores_sql
from benchmarks.sample_warehouse import Prepared
from cdp import demo
from cdp.config import Settings
from cdp.db import Base, Database
from cdp.sample_data import (
    CRM_FILE,
    RECORDS_FILE,
    SOURCE_CRM,
    SOURCE_TILL,
    SOURCE_WEB,
    TILL_FILE,
    WEB_FILE,
    generate,
    is_generated,
)
from cdp.warehouse import Query, Warehouse
from identity import service
from ingestion import service as ingestion_service
from migrations.models import load_all_models

logger = logging.getLogger(__name__)

SEED = 42
SHARED_SAMPLES = {20_000: Path("/work/sample-20k"), 1_000_000: Path("/work/sample-1m")}

# Each event's ground-truth key: its source name and record key (see the module docstring).
EVENT_RECORDS = Query(
    """
    SELECT s.name AS source, e.message_id AS record_key, e.event_id
    FROM events e JOIN src s ON s.id = e.source_id
    WHERE s.name <> $crm
    UNION ALL
    SELECT s.name, min(ei.value), e.event_id
    FROM events e JOIN src s ON s.id = e.source_id
    JOIN event_identifiers ei ON ei.event_id = e.event_id AND ei.kind = 'user_id'
    WHERE s.name = $crm
    GROUP BY s.name, e.event_id
    """,
    {"crm": SOURCE_CRM},
)

# Each event's raw component: the connected component of its usable identifiers before the
# per-kind limits (blocked and capped identifiers link nothing).
EVENT_COMPONENTS = """
    SELECT en.event_id, min(n.component_id) AS component_id
    FROM identity_event_nodes en JOIN identity_nodes n ON n.node_id = en.node_id
    WHERE n.status = 'active'
    GROUP BY en.event_id
"""

# Every ground-truth record with its person, its event (if it became one), its profile (a
# record without one is a profile of its own) and the raw component of its event.
SCORED_RECORDS = """
    CREATE OR REPLACE TEMP TABLE q_records AS
    WITH er AS ({records}),
    ep AS ({profiles}),
    comp AS ({components})
    SELECT t.person_id::VARCHAR AS person, er.event_id IS NOT NULL AS ingested,
           coalesce(ep.profile_id, 'none:' || t.source::VARCHAR || ':' || t.record_key)
               AS profile_id,
           comp.component_id
    FROM read_parquet($truth) t
    LEFT JOIN er ON er.source = t.source::VARCHAR AND er.record_key = t.record_key
    LEFT JOIN ep ON ep.event_id = er.event_id
    LEFT JOIN comp ON comp.event_id = er.event_id
"""
# The bound of any resolution by shared identifiers: every raw component split perfectly by
# true person. Records it cannot join (no identifier, or never seen with one shared with
# the person's other records) cost recall whatever the rules.
_BOUND = """
    (SELECT CASE WHEN component_id IS NULL THEN profile_id
                 ELSE component_id::VARCHAR || ':' || person END AS profile_id,
            person, ingested
     FROM q_records)
"""
RELATIONS = {
    "all": "q_records",
    "bound": _BOUND,
    "ingested": "(SELECT * FROM q_records WHERE ingested)",
    "ingested_bound": "(SELECT * FROM {bound} WHERE ingested)".replace("{bound}", _BOUND),
}


def sample_folder(scale: int, workdir: Path) -> Path:
    """The sample folder for `scale` customers: shared and ready, or generated here."""
    configured = os.environ.get("CDP_SAMPLE_DIR")
    shared = Path(configured) if configured else SHARED_SAMPLES.get(scale)
    if shared is not None and is_generated(shared, customers=scale, seed=SEED):
        return shared
    out = workdir / "sample"
    if not is_generated(out, customers=scale, seed=SEED):
        generate(customers=scale, seed=SEED, out=out)
    return out


def staging(sample: Path, workdir: Path) -> Path:
    """A folder of links to the sample's sources, where the demo may write its prepared file
    (the shared sample folders are read-only)."""
    stage = workdir / "stage"
    (stage / "sources").mkdir(parents=True, exist_ok=True)
    for name in (CRM_FILE, TILL_FILE, WEB_FILE):
        link = stage / name
        if not link.exists():
            link.symlink_to((sample / name).resolve())
    return stage


def load_sample(
    db: Database, warehouse: Warehouse, settings: Settings, sample: Path, workdir: Path
) -> dict[str, str]:
    """Import the three sources through the file connector, as the demo does."""
    sources = demo.ensure_sources(db)
    stage = staging(sample, workdir)
    imports: dict[str, str] = {}
    for source_id, name, path in (
        (sources.crm_id, SOURCE_CRM, stage / CRM_FILE),
        (sources.till_id, SOURCE_TILL, demo.prepare_till(stage)),
        (sources.web_id, SOURCE_WEB, stage / WEB_FILE),
    ):
        run = ingestion_service.import_file(
            db, warehouse, source_id=source_id, path=path, region=settings.default_phone_region
        )
        imports[name] = (
            f"{run.status}: {run.rows_read} read, {run.accepted} accepted,"
            f" {run.rejected} rejected, {run.duplicates} duplicates"
        )
    return imports


def score_against_truth(warehouse: Warehouse, db: Database, sample: Path) -> dict[str, float | int]:
    """Pairwise scores of the warehouse's profiles against the ground truth, computed in
    DuckDB (group-by counts of the profile x person contingency table, so the 1M sample's
    20M records score in the warehouse's memory limit)."""
    with db.begin() as session:
        listed, _ = ingestion_service.list_sources(session, limit=1000, offset=0)
        names = pl.DataFrame(
            [(s.id, s.name) for s in listed],
            schema={"id": pl.String, "name": pl.String},
            orient="row",
        )
    sql = (
        SCORED_RECORDS.replace("{records}", EVENT_RECORDS.sql)
        .replace("{profiles}", service.event_profile_sql())
        .replace("{components}", EVENT_COMPONENTS)
    )
    with warehouse.cursor() as cur:
        cur.register("src", names.to_arrow())
        try:
            cur.execute(sql, {**EVENT_RECORDS.params, "truth": str(sample / RECORDS_FILE)})
        finally:
            cur.unregister("src")
        try:
            scored = {name: scores_sql(cur, relation) for name, relation in RELATIONS.items()}
            records, without_event, without_profile = cur.execute(
                """
                SELECT count(*), count(*) FILTER (WHERE NOT ingested),
                       count(*) FILTER (WHERE starts_with(profile_id, 'none:'))
                FROM q_records
                """
            ).fetchall()[0]
            profiles = cur.execute(
                "SELECT count(DISTINCT profile_id) FROM ({profiles})".replace(
                    "{profiles}", service.event_profile_sql()
                )
            ).fetchall()[0][0]
        finally:
            cur.execute("DROP TABLE IF EXISTS q_records")
    figures = dict(scored["all"])
    figures["recall_bound"] = scored["bound"]["recall"]
    figures["ingested_precision"] = scored["ingested"]["precision"]
    figures["ingested_recall"] = scored["ingested"]["recall"]
    figures["ingested_recall_bound"] = scored["ingested_bound"]["recall"]
    figures["records"] = int(records)
    figures["records_without_event"] = int(without_event)
    figures["records_without_profile"] = int(without_profile)
    figures["profiles"] = int(profiles)
    return figures


def prepared_stores(sample: Path) -> Prepared | None:
    """The stores `benchmarks.sample_warehouse` prepared from `sample`, when
    `CDP_BENCH_PREPARED` names their folder and they are ready (they are copied, never
    written)."""
    folder = os.environ.get("CDP_BENCH_PREPARED")
    if not folder:
        return None
    prepared = sample_warehouse.load_ready(sample, Path(folder))
    if prepared is None:
        raise RuntimeError(f"{folder} holds no stores prepared from {sample}")
    return prepared


def run(scale: int, workdir: Path) -> Result:
    """Load the sample through the connectors (or copy the stores prepared from it, see
    `prepared_stores`), resolve fully, score against the ground truth."""
    result = Result(benchmark="identity_quality", scale=scale)
    sample = sample_folder(scale, workdir)
    settings = Settings(data_dir=workdir, scheduler={"enabled": False}, log_json=False)
    load_all_models()
    prepared = prepared_stores(sample)
    memory = os.environ.get("CDP_BENCH_DUCKDB_MEMORY", "3GB")
    if prepared is not None:
        copy = prepared.copy_to(workdir / "prepared")
        db = Database(f"sqlite:///{copy.database_file}")
        warehouse = Warehouse(copy.warehouse_file, memory_limit=memory).open()
    else:
        db = Database(f"sqlite:///{workdir / 'quality.sqlite3'}")
        Base.metadata.create_all(db.engine)
        warehouse = Warehouse(workdir / "quality.duckdb", memory_limit=memory).open()
    try:
        started = time.perf_counter()
        if prepared is not None:
            imports = {"prepared": str(prepared.out)}
        else:
            imports = load_sample(db, warehouse, settings, sample, workdir)
        load_seconds = time.perf_counter() - started
        with db.begin() as session:
            rules = service.get_rules(session)
        started = time.perf_counter()
        resolved = service.resolve(warehouse, settings=settings, rules=rules, full=True)
        resolve_seconds = time.perf_counter() - started
        started = time.perf_counter()
        figures = score_against_truth(warehouse, db, sample)
        score_seconds = time.perf_counter() - started
        result.add(
            Measure(
                name="pairwise precision (target 0.99)",
                unit="ratio",
                project=float(figures["precision"]),
                higher_is_better=True,
            )
        )
        result.add(
            Measure(
                name="pairwise recall (target 0.95)",
                unit="ratio",
                project=float(figures["recall"]),
                reference=float(figures["recall_bound"]),
                reference_name="bound of resolution by shared identifiers",
                higher_is_better=True,
            )
        )
        result.details = {
            "sample": str(sample),
            "imports": imports,
            "load_s": round(load_seconds, 2),
            "resolve_s": round(resolve_seconds, 2),
            "score_s": round(score_seconds, 2),
            "resolution": resolved.as_dict(),
            "quality": figures,
        }
    finally:
        warehouse.close()
        db.dispose()
    return result
