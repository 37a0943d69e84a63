"""A warehouse and operational store loaded from a generated sample, for benchmarks on real data.

`python -m benchmarks.sample_warehouse --sample DIR --out OUT` loads the sample folder written
by `cdp sample-data` through the platform's own connectors, as `cdp demo` does (the CRM CSV and
the prepared till orders through the file connector, the web/app NDJSON through the file
connector into the web source instead of an HTTP replay), then resolves identity. The result,
`OUT/cdp.sqlite3` and `OUT/warehouse.duckdb`, is reused while `OUT/ready.json` matches the
sample's manifest. Benchmarks that write copy the two files first (`copy_to`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from cdp import migrate
from cdp.config import Settings
from cdp.db import Database
from cdp.demo import ensure_sources, prepare_till
from cdp.sample_data import CRM_FILE, WEB_FILE
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from ingestion import service as ingestion_service

logger = logging.getLogger(__name__)

READY: Final = "ready.json"
WAREHOUSE: Final = "warehouse.duckdb"
DATABASE: Final = "cdp.sqlite3"


@dataclass(slots=True)
class Prepared:
    """Where a prepared sample lives and what it holds."""

    out: Path
    sample: str
    customers: int
    seed: int
    events: int
    profiles: int
    seconds: dict[str, float]

    @property
    def warehouse_file(self) -> Path:
        """The DuckDB file."""
        return self.out / WAREHOUSE

    @property
    def database_file(self) -> Path:
        """The SQLite operational store."""
        return self.out / DATABASE

    def settings(self, *, memory_limit: str = "3GB") -> Settings:
        """Settings pointing at this folder's two stores."""
        return Settings(data_dir=self.out, duckdb_memory_limit=memory_limit)

    def copy_to(self, target: Path) -> Prepared:
        """Copy both stores into `target` (a folder of the caller's) and describe the copy."""
        target.mkdir(parents=True, exist_ok=True)
        for name in (WAREHOUSE, DATABASE, READY):
            shutil.copyfile(self.out / name, target / name)
        return Prepared(**{**asdict(self), "out": target})


def _manifest(sample: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((sample / "manifest.json").read_text())
    return data


def _load_ready(sample: Path, out: Path) -> Prepared | None:
    path = out / READY
    if not path.is_file() or not (out / WAREHOUSE).is_file():
        return None
    ready = json.loads(path.read_text())
    manifest = _manifest(sample)
    if ready.get("customers") != manifest.get("customers") or ready.get("seed") != manifest.get(
        "seed"
    ):
        return None
    ready["out"] = out
    return Prepared(**ready)


def load_ready(sample: Path, out: Path) -> Prepared | None:
    """The stores under `out` when they are ready and were prepared from `sample` (read only)."""
    return _load_ready(sample.resolve(), out.resolve())


def ensure(
    sample: Path, out: Path, *, memory_limit: str = "3GB", rebuild: bool = False
) -> Prepared:
    """Load `sample` into stores under `out` (or reuse them) and return where they are."""
    sample, out = sample.resolve(), out.resolve()
    if not rebuild and (found := _load_ready(sample, out)) is not None:
        return found
    manifest = _manifest(sample)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    settings = Settings(data_dir=out, duckdb_memory_limit=memory_limit)
    migrate.upgrade(settings.db_url)
    db = Database.from_settings(settings)
    warehouse = Warehouse(
        settings.warehouse_file, memory_limit=memory_limit, holder="benchmarks.sample_warehouse"
    ).open()
    seconds: dict[str, float] = {}
    try:
        sources = ensure_sources(db)
        started = time.perf_counter()
        till = prepare_till(sample)
        seconds["prepare_till"] = time.perf_counter() - started
        for name, source_id, path in (
            ("crm", sources.crm_id, sample / CRM_FILE),
            ("till", sources.till_id, till),
            ("web", sources.web_id, sample / WEB_FILE),
        ):
            started = time.perf_counter()
            run = ingestion_service.import_file(
                db,
                warehouse,
                source_id=source_id,
                path=path,
                region=settings.default_phone_region,
            )
            seconds[f"import_{name}"] = time.perf_counter() - started
            logger.info(
                "imported %s: %s rows read, %s accepted, %s rejected in %.1f s",
                name,
                run.rows_read,
                run.accepted,
                run.rejected,
                seconds[f"import_{name}"],
            )
        with db.begin() as session:
            rules = identity_service.get_rules(session)
        started = time.perf_counter()
        identity_service.resolve(warehouse, settings=settings, rules=rules, full=True)
        seconds["identity"] = time.perf_counter() - started
        events = int(warehouse.scalar(Query("SELECT count(*) FROM events")) or 0)
        profiles = int(warehouse.scalar(Query("SELECT count(*) FROM profiles")) or 0)
        logger.info("identity: %s profiles in %.1f s", profiles, seconds["identity"])
    finally:
        warehouse.close()
        db.dispose()
    prepared = Prepared(
        out=out,
        sample=str(sample),
        customers=int(str(manifest["customers"])),
        seed=int(str(manifest["seed"])),
        events=events,
        profiles=profiles,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
    ready = {k: v for k, v in asdict(prepared).items() if k != "out"}
    (out / READY).write_text(json.dumps(ready, indent=2) + "\n")
    return prepared


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the prepared stores and print what they hold."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sample_warehouse", description=__doc__
    )
    parser.add_argument("--sample", type=Path, required=True, help="a folder from cdp sample-data")
    parser.add_argument("--out", type=Path, required=True, help="where to put the stores")
    parser.add_argument("--memory-limit", default="3GB", help="DuckDB memory limit")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even when ready")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    prepared = ensure(args.sample, args.out, memory_limit=args.memory_limit, rebuild=args.rebuild)
    print(json.dumps({**asdict(prepared), "out": str(prepared.out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
