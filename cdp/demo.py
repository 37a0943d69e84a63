"""`cdp demo`: load the sample data through the platform's own connectors and engines, then serve.

Composition-level code: it calls the packages' `service` modules in the order a new
installation would use them, and every step is idempotent, so a second run adds nothing:

1. sources are found by name (created the first time): a `file` source for the CRM CSV, a
   `file` source for the till orders and an `http` source for the web and app events;
2. the CRM CSV and the till orders are imported with `ingestion.service.import_file` (a file
   already imported is a content-hash no-op). The till export has one row per transaction with
   a `lines` list of structs; the file connector maps columns, not nested renames, so the demo
   pre-shapes it with Polars into `DATA_DIR/sample/prepared/till_orders.parquet` (Segment-style
   `Order Completed` / `Order Refunded` rows with `order_id`, `revenue`, `total` and
   `products` [{sku, category, brand, price, quantity}]), which the connector reads;
3. identity resolution, the attribute refresh, the demo loyalty programme (created once, as
   a draft), three saved segments and the dashboards' KPI snapshots;
4. the server starts; a background thread then replays `web_events.ndjson` through the
   tracking API over HTTP (`/v1/batch`, several connections) while the scheduler's jobs
   (identity every 5 s, attributes every 5 minutes) fold the web events in as they arrive. The
   tracking API dedupes on `messageId`, so a second replay stores nothing;
5. once every replayed event is loaded and identity has resolved it (`resolve_history`), the
   programme goes live and is backfilled over the whole history by running the job
   `loyalty.process_events` through the server's job runner (its first run from event 0 is
   the backfill, in short transactions; the runner never lets it overlap the scheduler's own
   run). Earning on a history whose identities are still being resolved would enrol two
   profiles that a later web event merges, so the result would depend on timing;
6. the job `dashboards.kpi_snapshots` runs once more through the runner, so the KPI snapshots
   hold the history the replay and the backfill brought (by event time; it is idempotent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import polars as pl
from sqlalchemy import select

from cdp.auth import ApiKey, Role, create_key, revoke_key
from cdp.config import Settings
from cdp.db import Database
from cdp.errors import Conflict
from cdp.sample_data import CRM_FILE, SOURCE_CRM, SOURCE_TILL, SOURCE_WEB, TILL_FILE, WEB_FILE
from cdp.scheduler import JobRunner
from cdp.warehouse import Query, Warehouse
from dashboards import service as dashboards_service
from identity import service as identity_service
from ingestion import service as ingestion_service
from ingestion.schemas import IdentifierSpec, Mapping
from loyalty import service as loyalty_service
from loyalty.schemas import ProgramUpdate
from segments import service as segments_service

logger = logging.getLogger(__name__)

ADMIN_KEY_NAME: Final = "demo admin"
PROGRAM_NAME: Final = "Demo Club"
LOYALTY_JOB: Final = "loyalty.process_events"
SNAPSHOT_JOB: Final = "dashboards.kpi_snapshots"
PREPARED_TILL: Final = "prepared/till_orders.parquet"
REPLAY_BATCH: Final = 250
REPLAY_CONNECTIONS: Final = 4
HISTORY_TIMEOUT: Final = 300.0  # seconds the replayed events may take to be loaded
_COUNT_PROFILES: Final = Query("SELECT count(*) FROM profiles")

CRM_MAPPING: Final = Mapping(
    type="identify",
    event="CRM Customer Updated",
    timestamp="updated_at",
    identifiers=[
        IdentifierSpec(kind="user_id", column="customer_id"),
        IdentifierSpec(kind="email", column="email"),
        IdentifierSpec(kind="phone", column="phone"),
        IdentifierSpec(kind="loyalty_card", column="loyalty_card"),
    ],
    traits=[
        "first_name",
        "last_name",
        "birth_date",
        "postcode",
        "email_opt_in",
        "sms_opt_in",
        "signup_date",
    ],
)
TILL_MAPPING: Final = Mapping(
    type="track",
    event_column="event",
    timestamp="timestamp",
    message_id="transaction_id",
    identifiers=[
        IdentifierSpec(kind="loyalty_card", column="loyalty_card"),
        IdentifierSpec(kind="email", column="email"),
        IdentifierSpec(kind="phone", column="phone"),
    ],
    properties=["order_id", "revenue", "total", "currency", "store_id", "products"],
)
# Rules use the built-in attributes of `segments` (see docs/segments.md).
SEGMENTS: Final[tuple[tuple[str, str, dict[str, Any]], ...]] = (  # Any: rule JSON
    (
        "High spenders",
        "Spent 500 EUR or more over the last 365 days",
        {"field": "attributes.spend_365d", "op": "gte", "value": 500},
    ),
    (
        "Lapsed buyers",
        "Bought before, but not in the last 180 days",
        {"field": "attributes.days_since_last_purchase", "op": "gt", "value": 180},
    ),
    (
        "Regular buyers",
        "Three orders or more in the last 365 days",
        {
            "event": "Order Completed",
            "count": {"op": "at_least", "value": 3},
            "last_days": 365,
        },
    ),
)


class HistoryNotReady(RuntimeError):
    """The history the demo programme would be backfilled over is not complete."""


class TrackingLoads(Protocol):
    """What loads the tracking API's acknowledged events (the server's tracking runtime)."""

    def wait_drained(self, *, timeout: float) -> bool:
        """Wait until every acknowledged event is loaded; False after `timeout` seconds."""
        ...


@dataclass(slots=True)
class DemoSources:
    """The three demo sources and the web source's (freshly rotated) write key."""

    crm_id: str
    till_id: str
    web_id: str
    write_key: str


@dataclass(slots=True)
class DemoSummary:
    """What `prepare` did, for the summary block."""

    sources: DemoSources
    imports: dict[str, str] = field(default_factory=dict)
    profiles: int = 0
    program_id: str = ""
    program_created: bool = False
    members: int = 0
    balance_line: str = ""
    segments: dict[str, int] = field(default_factory=dict)
    snapshot_rows: int = 0
    admin_key: str = ""
    seconds: float = 0.0


def prepare_till(sample_dir: Path) -> Path:
    """Shape the till export into one Segment-style order event per row (Parquet).

    Sales become `Order Completed` and returns `Order Refunded` (positive amounts and
    quantities, `order_id` naming the sale), `lines` become `products`. Rewritten only when the
    export is newer, so the file's content hash, and hence its import, stays the same.
    """
    source = sample_dir / TILL_FILE
    target = sample_dir / PREPARED_TILL
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    refund = pl.col("kind") == "refund"
    amount = pl.col("total").abs().round(2)
    product = pl.struct(
        pl.element().struct.field("sku"),
        pl.element().struct.field("category"),
        pl.element().struct.field("brand"),
        pl.element().struct.field("unit_price").alias("price"),
        pl.element().struct.field("quantity").abs().alias("quantity"),
    )
    frame = pl.read_parquet(source).select(
        "transaction_id",
        "timestamp",
        "loyalty_card",
        "email",
        "phone",
        "store_id",
        pl.when(refund)
        .then(pl.lit("Order Refunded"))
        .otherwise(pl.lit("Order Completed"))
        .alias("event"),
        pl.when(refund)
        .then(pl.col("original_transaction_id"))
        .otherwise(pl.col("transaction_id"))
        .alias("order_id"),
        amount.alias("revenue"),
        amount.alias("total"),
        pl.lit("EUR").alias("currency"),
        pl.col("lines").list.eval(product).alias("products"),
    )
    tmp = target.with_suffix(".tmp")
    frame.write_parquet(tmp, statistics=False)
    tmp.replace(target)
    return target


def ensure_sources(db: Database) -> DemoSources:
    """Find the demo sources by name, creating the missing ones; rotate the web write key."""
    with db.begin() as session:
        ids: dict[str, str] = {}
        for name, mapping in ((SOURCE_CRM, CRM_MAPPING), (SOURCE_TILL, TILL_MAPPING)):
            found = ingestion_service.find_source_by_name(session, name=name)
            if found is None:
                found, _ = ingestion_service.create_source(
                    session, name=name, kind="file", mapping=mapping
                )
            ids[name] = found.id
        web = ingestion_service.find_source_by_name(session, name=SOURCE_WEB)
        if web is None:
            web, key = ingestion_service.create_source(session, name=SOURCE_WEB, kind="http")
        else:
            web, key = ingestion_service.rotate_write_key(session, source_id=web.id)
        assert key is not None  # an http source always gets a key
        return DemoSources(ids[SOURCE_CRM], ids[SOURCE_TILL], web.id, key)


def new_admin_key(db: Database) -> str:
    """Revoke the previous demo admin keys and make a new one (a key is shown only once)."""
    with db.begin() as session:
        old = session.scalars(
            select(ApiKey).where(ApiKey.name == ADMIN_KEY_NAME, ApiKey.revoked_at.is_(None))
        ).all()
        for key in old:
            revoke_key(session, key_id=key.id)
        _, clear = create_key(session, name=ADMIN_KEY_NAME, role=Role.admin)
        return clear


def _ensure_program(db: Database, warehouse: Warehouse, summary: DemoSummary) -> None:
    """Create the demo programme once, or sync it.

    It is created as a draft, which the real-time job leaves alone: it goes live once the
    web replay is loaded and resolved (see `backfill_program`). A programme whose mark is
    still 0 (a demo stopped before its backfill) is taken as new.
    """
    with db.begin() as session:
        programs, _ = loyalty_service.list_programs(session, limit=1000, offset=0)
        program = next((p for p in programs if p.name == PROGRAM_NAME), None)
        if program is None:
            program = loyalty_service.create_demo_program(session, status="draft")
        summary.program_id = program.id
        summary.program_created = program.last_event_id == 0
    if not summary.program_created:
        with db.begin() as session:
            loyalty_service.sync_program(session, warehouse, program_id=summary.program_id)
        _describe_members(db, summary)


def _describe_members(db: Database, summary: DemoSummary) -> None:
    with db.begin() as session:
        members, summary.members = loyalty_service.list_members(
            session, program_id=summary.program_id, limit=200, offset=0
        )
        for member in members:
            _, view = loyalty_service.member_balance(session, member_id=member.id)
            if view.total > 0:
                summary.balance_line = (
                    f"member {member.id} (profile {member.profile_id}): {view.total} points"
                    f" ({view.active} active, {view.pending} pending)"
                )
                break


def resolve_history(
    db: Database,
    warehouse: Warehouse,
    settings: Settings,
    *,
    tracking: TrackingLoads,
    timeout: float = HISTORY_TIMEOUT,
    say: Callable[[str], None],
) -> int:
    """Wait until every acknowledged tracking event is loaded, then resolve identity up to it.

    Returns the loaded high-water mark, which identity's resolved mark has reached.

    Raises:
        HistoryNotReady: the events were not all loaded within `timeout` seconds, or
            resolution stopped short of them.
    """
    started = time.perf_counter()
    if not tracking.wait_drained(timeout=timeout):
        raise HistoryNotReady(
            f"the replayed events were not all loaded into the warehouse within {timeout:g} s"
        )
    loaded = ingestion_service.high_water_mark(warehouse)
    with db.begin() as session:
        rules = identity_service.get_rules(session)
    # On demand rather than waiting for identity's scheduled run; the resolver's lock makes
    # the two safe together.
    identity_service.resolve(warehouse, settings=settings, rules=rules)
    resolved = identity_service.resolved_up_to(warehouse)
    if resolved < loaded:
        raise HistoryNotReady(f"identity resolved events up to {resolved} of {loaded} loaded")
    profiles = int(warehouse.scalar(_COUNT_PROFILES) or 0)
    say(
        f"history loaded and resolved in {time.perf_counter() - started:.1f} s:"
        f" events up to {loaded}, {profiles} profiles"
    )
    return loaded


def backfill_program(
    db: Database,
    warehouse: Warehouse,
    runner: JobRunner,
    summary: DemoSummary,
    *,
    say: Callable[[str], None],
) -> None:
    """Make the new demo programme live and backfill it over the history, through the
    server's job runner. Call it once the history is resolved (`resolve_history`).

    Once active, the real-time job `loyalty.process_events` would take its history too;
    running that job (its first run from event 0 is the backfill: `process_range` over the
    whole history, then the mark moves) through the runner means the two never overlap. If
    the scheduler started it first, this waits for it.
    """
    started = time.perf_counter()
    with db.begin() as session:
        loyalty_service.update_program(
            session,
            program_id=summary.program_id,
            data=ProgramUpdate(status="active"),
            warehouse=warehouse,
        )
    say(f"loyalty programme {PROGRAM_NAME} is live; backfilling its history")
    while True:
        try:
            run = runner.run(LOYALTY_JOB, trigger="manual")
            break
        except Conflict:
            time.sleep(0.5)
    _describe_members(db, summary)
    say(
        f"loyalty backfill done in {time.perf_counter() - started:.1f} s ({run.status}):"
        f" {summary.members} members"
    )
    if summary.balance_line:
        say(f"  e.g. {summary.balance_line}")


def snapshot_history(runner: JobRunner, *, say: Callable[[str], None]) -> None:
    """Run the KPI snapshot job through the server's runner (waits for a run in progress)."""
    while True:
        try:
            run = runner.run(SNAPSHOT_JOB, trigger="manual")
            break
        except Conflict:
            time.sleep(0.5)
    say(f"KPI snapshots ({run.status}): {run.rows or 0} rows written")


def _ensure_segments(db: Database, warehouse: Warehouse, settings: Settings) -> dict[str, int]:
    counts: dict[str, int] = {}
    with db.begin() as session:
        existing, _ = segments_service.list_segments(session, limit=1000, offset=0)
        by_name = {s.name: s.id for s in existing}
        for name, description, rule in SEGMENTS:
            if name not in by_name:
                row = segments_service.create_segment(
                    session,
                    warehouse,
                    name=name,
                    description=description,
                    rule=rule,
                    refresh_minutes=60,
                    settings=settings.segments,
                    actor="cdp demo",
                )
                by_name[name] = row.id
    for name, _, _ in SEGMENTS:
        with db.begin() as session:
            result = segments_service.refresh_segment(
                session, warehouse, segment_id=by_name[name], settings=settings.segments
            )
            counts[name] = result.size
    return counts


def prepare(
    settings: Settings,
    db: Database,
    warehouse: Warehouse,
    *,
    sample_dir: Path,
    say: Callable[[str], None],
) -> DemoSummary:
    """Steps 1 and 3: sources, file imports, identity, attributes, loyalty, segments, KPIs."""
    started = time.perf_counter()
    sources = ensure_sources(db)
    summary = DemoSummary(sources=sources)
    till = prepare_till(sample_dir)
    for source_id, name, path in (
        (sources.crm_id, SOURCE_CRM, sample_dir / CRM_FILE),
        (sources.till_id, SOURCE_TILL, till),
    ):
        run = ingestion_service.import_file(
            db, warehouse, source_id=source_id, path=path, region=settings.default_phone_region
        )
        summary.imports[name] = (
            f"{run.status}{' (already imported)' if run.skipped else ''}: {run.rows_read} rows"
            f" read, {run.accepted} accepted, {run.rejected} rejected,"
            f" {run.duplicates} duplicates"
        )
        say(f"{name}: {summary.imports[name]}")
    with db.begin() as session:
        rules = identity_service.get_rules(session)
    resolved = identity_service.resolve(warehouse, settings=settings, rules=rules)
    summary.profiles = int(warehouse.scalar(_COUNT_PROFILES) or 0)
    say(f"identity: {resolved.mode}, {resolved.events} events, {summary.profiles} profiles")
    with db.begin() as session:
        segments_service.refresh_derived(session, warehouse, settings=settings.segments)
    _ensure_program(db, warehouse, summary)
    summary.segments = _ensure_segments(db, warehouse, settings)
    with db.begin() as session:
        summary.snapshot_rows = dashboards_service.take_snapshots(session, warehouse=warehouse)
    summary.admin_key = new_admin_key(db)
    summary.seconds = time.perf_counter() - started
    return summary


def _batches(path: Path, size: int) -> Iterator[bytes]:
    """Bodies of `/v1/batch` requests: the file's lines as they are, `size` per batch."""
    lines: list[bytes] = []
    with path.open("rb") as handle:
        for line in handle:
            line = line.strip()
            if line:
                lines.append(line)
            if len(lines) == size:
                yield b'{"batch":[' + b",".join(lines) + b"]}"
                lines = []
    if lines:
        yield b'{"batch":[' + b",".join(lines) + b"]}"


@dataclass(slots=True)
class ReplayResult:
    """What the tracking API answered to the replay."""

    requests: int = 0
    messages: int = 0
    rejected: int = 0
    failed: int = 0
    seconds: float = 0.0


def replay(
    base_url: str,
    write_key: str,
    path: Path,
    *,
    batch: int = REPLAY_BATCH,
    connections: int = REPLAY_CONNECTIONS,
    say: Callable[[str], None],
) -> ReplayResult:
    """Send an NDJSON file of Segment messages to `/v1/batch` over HTTP, several at a time."""
    result = ReplayResult()
    started = time.perf_counter()
    lock = threading.Lock()
    local = threading.local()

    def send(body: bytes) -> None:
        client: httpx.Client | None = getattr(local, "client", None)
        if client is None:
            client = httpx.Client(base_url=base_url, auth=(write_key, ""), timeout=60.0)
            local.client = client
            clients.append(client)
        while True:
            response = client.post(
                "/v1/batch", content=body, headers={"Content-Type": "application/json"}
            )
            if response.status_code != 429:
                break
            time.sleep(float(response.headers.get("Retry-After", "1")))
        count = body.count(b'"messageId"')
        with lock:
            result.requests += 1
            if response.status_code == 200:
                result.messages += count
                result.rejected += len(response.json().get("rejected", []))
            else:
                result.failed += count
                logger.warning(
                    "replay batch refused",
                    extra={"status": response.status_code, "body": response.text[:200]},
                )
            if result.requests % 100 == 0:
                rate = result.messages / max(time.perf_counter() - started, 1e-9)
                say(f"web replay: {result.messages} events sent ({rate:,.0f}/s)")

    clients: list[httpx.Client] = []
    try:
        with ThreadPoolExecutor(connections, thread_name_prefix="demo-replay") as pool:
            for future in [pool.submit(send, body) for body in _batches(path, batch)]:
                future.result()
    finally:
        for client in clients:
            client.close()
    result.seconds = time.perf_counter() - started
    return result


def summary_lines(summary: DemoSummary, *, base_url: str, web_events: int) -> list[str]:
    """The summary block; the admin key is its last line."""
    lines = ["CDP demo ready" + f" (prepared in {summary.seconds:.1f} s)"]
    lines += [f"  {name}: {text}" for name, text in summary.imports.items()]
    lines.append(
        f"  {SOURCE_WEB}: {web_events} events being replayed over HTTP to {base_url}/v1/batch"
    )
    lines.append(f"Profiles resolved: {summary.profiles}")
    if summary.program_created:
        lines.append(
            f"Loyalty programme {PROGRAM_NAME} ({summary.program_id}): created as a draft; it"
            " goes live and is backfilled once the web replay is loaded and resolved"
        )
    else:
        lines.append(
            f"Loyalty programme {PROGRAM_NAME} ({summary.program_id}): already there, synced,"
            f" {summary.members} members"
        )
        if summary.balance_line:
            lines.append(f"  e.g. {summary.balance_line}")
    for name, members in summary.segments.items():
        lines.append(f"Segment {name!r}: {members} members")
    lines.append(f"KPI snapshot rows written: {summary.snapshot_rows}")
    lines.append(f"API docs:    {base_url}/docs")
    lines.append(f"Dashboards:  {base_url}/dashboards")
    lines.append(f"Admin API key: {summary.admin_key}")
    return lines


def count_lines(path: Path) -> int:
    """Number of non-empty lines of a text file."""
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def run(
    settings: Settings,
    *,
    sample_dir: Path,
    say: Callable[[str], None],
    show: Callable[[str], None],
) -> None:
    """Prepare everything, print the summary with `show`, then serve until interrupted."""
    import uvicorn

    from cdp.app import create_app, freeze_startup_objects, server_options

    db = Database.from_settings(settings)
    warehouse = Warehouse(
        settings.warehouse_file,
        memory_limit=settings.duckdb_memory_limit,
        threads=settings.duckdb_threads,
        holder=f"cdp demo (http://{settings.host}:{settings.port})",
    ).open()
    try:
        summary = prepare(settings, db, warehouse, sample_dir=sample_dir, say=say)
    except BaseException:
        warehouse.close()
        db.dispose()
        raise
    base_url = f"http://{settings.host}:{settings.port}"
    web_file = sample_dir / WEB_FILE
    # The app owns both stores from here: its lifespan closes them on shutdown.
    application = create_app(settings, db=db, warehouse=warehouse)
    freeze_startup_objects()
    server = uvicorn.Server(uvicorn.Config(application, **server_options(settings)))

    def when_up(step: Callable[[], None], name: str) -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        try:
            step()
        except Exception as exc:
            logger.exception("demo step failed", extra={"step": name})
            say(f"{name} failed: {exc}")

    def load_history() -> None:
        done = replay(base_url, summary.sources.write_key, web_file, say=say)
        say(
            f"web replay done: {done.messages} events in {done.requests} requests,"
            f" {done.rejected} rejected, {done.failed} failed, in {done.seconds:.1f} s"
        )
        if not summary.program_created:
            return
        if done.failed:
            raise HistoryNotReady(
                f"{done.failed} replayed events were refused; {PROGRAM_NAME} stays a draft"
                " (run the demo again to backfill it)"
            )
        resolve_history(db, warehouse, settings, tracking=application.state.ingestion, say=say)
        backfill_program(db, warehouse, application.state.runner, summary, say=say)

    def snapshots_after() -> None:
        history.join()
        snapshot_history(application.state.runner, say=say)

    for line in summary_lines(summary, base_url=base_url, web_events=count_lines(web_file)):
        show(line)
    history = threading.Thread(
        target=when_up, args=(load_history, "history"), name="demo history", daemon=True
    )
    snapshots = threading.Thread(
        target=when_up, args=(snapshots_after, "kpi snapshots"), name="kpi snapshots", daemon=True
    )
    history.start()
    snapshots.start()
    server.run()
