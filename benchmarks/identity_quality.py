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
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import polars as pl

from benchmarks.core import Measure, Result
from benchmarks.identity import scores
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
EVENT_COMPONENTS = Query(
    """
    SELECT en.event_id, min(n.component_id) AS component_id
    FROM identity_event_nodes en JOIN identity_nodes n ON n.node_id = en.node_id
    WHERE n.status = 'active'
    GROUP BY en.event_id
    """
)


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


def score_against_truth(
    warehouse: Warehouse, db: Database, sample: Path
) -> tuple[dict[str, float | int], pl.DataFrame]:
    """Pairwise scores of the warehouse's profiles against the ground truth, and the frame
    of (source, record_key, person, profile_id) they were computed from."""
    with db.begin() as session:
        listed, _ = ingestion_service.list_sources(session, limit=1000, offset=0)
        names = pl.DataFrame(
            [(s.id, s.name) for s in listed],
            schema={"id": pl.String, "name": pl.String},
            orient="row",
        )
    with warehouse.cursor() as cur:
        cur.register("src", names)
        try:
            records = cur.sql(EVENT_RECORDS.sql, params=EVENT_RECORDS.params).pl()
        finally:
            cur.unregister("src")
    profiles = service.event_profiles(warehouse, after_event_id=0)
    truth = pl.read_parquet(sample / RECORDS_FILE).with_columns(pl.col("source").cast(pl.String))
    frame = (
        truth.join(records, on=["source", "record_key"], how="left")
        .join(profiles, on="event_id", how="left")
        .with_columns(
            pl.col("profile_id").fill_null(
                pl.lit("none:") + pl.col("source") + ":" + pl.col("record_key")
            ),
        )
        .rename({"person_id": "person"})
    )
    figures = scores(frame.select("profile_id", "person"))
    # The bound of any resolution by shared identifiers: every raw component split perfectly
    # by true person. Records it cannot join (no identifier, or never seen with one shared
    # with the person's other records) cost recall whatever the rules.
    components = warehouse.run(EVENT_COMPONENTS)
    bound = frame.join(components, on="event_id", how="left").select(
        pl.when(pl.col("component_id").is_null())
        .then(pl.col("profile_id"))
        .otherwise(pl.col("component_id").cast(pl.String) + ":" + pl.col("person"))
        .alias("profile_id"),
        "person",
    )
    figures["recall_bound"] = scores(bound)["recall"]
    ingested = frame.filter(pl.col("event_id").is_not_null())
    figures["ingested_precision"], figures["ingested_recall"] = (
        scores(ingested.select("profile_id", "person"))[k] for k in ("precision", "recall")
    )
    figures["ingested_recall_bound"] = scores(bound.filter(frame["event_id"].is_not_null()))[
        "recall"
    ]
    figures["records"] = frame.height
    figures["records_without_event"] = int(frame["event_id"].null_count())
    figures["records_without_profile"] = int(frame["profile_id"].str.starts_with("none:").sum())
    figures["profiles"] = int(profiles["profile_id"].n_unique())
    return figures, frame


def run(scale: int, workdir: Path) -> Result:
    """Load the sample through the connectors, resolve, score against the ground truth."""
    result = Result(benchmark="identity_quality", scale=scale)
    sample = sample_folder(scale, workdir)
    settings = Settings(data_dir=workdir, scheduler={"enabled": False}, log_json=False)
    load_all_models()
    db = Database(f"sqlite:///{workdir / 'quality.sqlite3'}")
    Base.metadata.create_all(db.engine)
    memory = os.environ.get("CDP_BENCH_DUCKDB_MEMORY", "3GB")
    warehouse = Warehouse(workdir / "quality.duckdb", memory_limit=memory).open()
    try:
        started = time.perf_counter()
        imports = load_sample(db, warehouse, settings, sample, workdir)
        load_seconds = time.perf_counter() - started
        with db.begin() as session:
            rules = service.get_rules(session)
        started = time.perf_counter()
        resolved = service.resolve(warehouse, settings=settings, rules=rules, full=True)
        resolve_seconds = time.perf_counter() - started
        figures, _ = score_against_truth(warehouse, db, sample)
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
            "resolution": resolved.as_dict(),
            "quality": figures,
        }
    finally:
        warehouse.close()
        db.dispose()
    return result
