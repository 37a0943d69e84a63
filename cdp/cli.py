"""The `cdp` command line: set up the stores, serve, manage keys, make sample data, run jobs."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from cdp import migrate as migrations
from cdp.auth import ApiKey, Role, create_key, list_keys, revoke_key
from cdp.config import Settings, get_settings
from cdp.db import Database
from cdp.errors import CdpError, NotFound
from cdp.logs import configure_logging
from cdp.warehouse import Warehouse
from identity import cli as identity_cli

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="cdp",
    help="Customer Data Platform with an integrated loyalty engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(help="Create, list and revoke management API keys.", no_args_is_help=True)
jobs_app = typer.Typer(help="List and run background jobs.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(jobs_app, name="jobs")

console = Console(stderr=True)
out = Console()

P = ParamSpec("P")
R = TypeVar("R")

DEMO_CUSTOMERS = 20_000


def cli_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn a platform error into its message on stderr and exit code 1."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except CdpError as exc:
            console.print(f"[red]error:[/red] {exc.message}")
            raise typer.Exit(1) from exc

    return wrapper


def _settings() -> Settings:
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=False)
    return settings


def _open_warehouse(settings: Settings, holder: str) -> Warehouse:
    return Warehouse(
        settings.warehouse_file,
        memory_limit=settings.duckdb_memory_limit,
        threads=settings.duckdb_threads,
        holder=holder,
    ).open()


def _prepare_stores(settings: Settings) -> None:
    """Create the data dir, bring the operational store to head and the warehouse schema up."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.db_url)
    warehouse = _open_warehouse(settings, "cdp migrate")
    try:
        version = warehouse.schema_version()
    finally:
        warehouse.close()
    console.print(f"operational store at head; warehouse schema version {version}")


def _ensure_admin_key(db: Database, name: str) -> str | None:
    """Create an admin key when none is active; returns the clear key if one was made."""
    with db.begin() as session:
        rows, _ = list_keys(session, limit=1000, offset=0)
        if any(r.role == Role.admin and r.revoked_at is None and r.name == name for r in rows):
            return None
        _, clear = create_key(session, name=name, role=Role.admin)
        return clear


@app.command()
@cli_errors
def init() -> None:
    """Create the data directory and both stores, then print a new admin API key."""
    settings = _settings()
    _prepare_stores(settings)
    db = Database.from_settings(settings)
    try:
        clear = _ensure_admin_key(db, "admin")
    finally:
        db.dispose()
    if clear:
        console.print("admin API key (shown once; keep it):")
        out.print(clear, soft_wrap=True)
    else:
        console.print("an admin key named 'admin' exists already; `cdp keys create` makes more")


@app.command()
@cli_errors
def migrate() -> None:
    """Upgrade the operational store to the latest revision and apply the warehouse DDL."""
    _prepare_stores(_settings())


@app.command()
@cli_errors
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
    scheduler: Annotated[bool, typer.Option(help="Run background jobs")] = True,
) -> None:
    """Run the API server (migrating the stores first)."""
    base = _settings()
    overrides: dict[str, Any] = {}  # Any: settings field values
    if host:
        overrides["host"] = host
    if port:
        overrides["port"] = port
    if not scheduler:
        overrides["scheduler"] = {"enabled": False}
    _serve(Settings(**{**base.model_dump(), **overrides}) if overrides else base)


def _serve(settings: Settings) -> None:
    import uvicorn

    from cdp.app import create_app, freeze_startup_objects, server_options

    migrations.upgrade(settings.db_url)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    application = create_app(settings)
    freeze_startup_objects()
    uvicorn.run(application, **server_options(settings))


@keys_app.command("create")
@cli_errors
def keys_create(
    role: Annotated[Role, typer.Option(help="What the key may do")],
    name: Annotated[str, typer.Option(help="Who or what the key is for")],
) -> None:
    """Create an API key; the key itself is the last line of output."""
    settings = _settings()
    migrations.upgrade(settings.db_url)
    db = Database.from_settings(settings)
    try:
        with db.begin() as session:
            key, clear = create_key(session, name=name, role=role)
            key_id = key.id
    finally:
        db.dispose()
    console.print(f"created key {key_id} ({role.value}, {name}); it is shown once:")
    out.print(clear, soft_wrap=True)


@keys_app.command("list")
@cli_errors
def keys_list() -> None:
    """List API keys (never their secrets)."""
    db = Database.from_settings(_settings())
    try:
        with db.begin() as session:
            rows, _ = list_keys(session, limit=1000, offset=0)
            for key in rows:
                out.print(_describe_key(key))
    finally:
        db.dispose()


def _describe_key(key: ApiKey) -> str:
    state = "revoked" if key.revoked_at else "active"
    used = key.last_used_at.isoformat() if key.last_used_at else "never"
    return f"{key.id}  {key.role:<8} {state:<7} cdp_{key.prefix}_…  {key.name}  last used {used}"


@keys_app.command("revoke")
@cli_errors
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Id of the key")]) -> None:
    """Revoke an API key."""
    db = Database.from_settings(_settings())
    try:
        with db.begin() as session:
            key = revoke_key(session, key_id=key_id)
            out.print(_describe_key(key))
    finally:
        db.dispose()


@jobs_app.command("list")
@cli_errors
def jobs_list() -> None:
    """List registered jobs."""
    from cdp.app import registered_jobs

    for spec in registered_jobs():
        out.print(f"{spec.name:<28} {spec.schedule:<28} {spec.description}")


@jobs_app.command("run")
@cli_errors
def jobs_run(name: Annotated[str, typer.Argument(help="Job name")]) -> None:
    """Run a job now, in this process (the server must not hold the warehouse)."""
    from cdp.app import registered_jobs
    from cdp.scheduler import JobRunner

    settings = _settings()
    db = Database.from_settings(settings)
    warehouse = _open_warehouse(settings, f"cdp jobs run {name}")
    try:
        runner = JobRunner(settings, db, warehouse)
        runner.register(*registered_jobs())
        run = runner.run(name, trigger="cli")
        runner.shutdown()
    finally:
        warehouse.close()
        db.dispose()
    out.print(f"{run.job}: {run.status}, {run.rows} rows" + (f": {run.error}" if run.error else ""))
    if run.status != "succeeded":
        raise typer.Exit(1)


@app.command()
@cli_errors
def ingest(
    source: Annotated[str, typer.Argument(help="Name or id of a `file` source")],
    paths: Annotated[
        list[str], typer.Argument(help="Files or glob patterns (CSV, Parquet, NDJSON)")
    ],
) -> None:
    """Import files into a `file` source, with a progress bar (the server must be stopped)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TimeElapsedColumn,
    )

    from ingestion import service as ingestion_service

    settings = _settings()
    migrations.upgrade(settings.db_url)
    files = _expand(paths)
    db = Database.from_settings(settings)
    warehouse = _open_warehouse(settings, f"cdp ingest {source}")
    try:
        with db.begin() as session:
            found = ingestion_service.find_source_by_name(session, name=source)
            source_id = (found or ingestion_service.get_source(session, source_id=source)).id
        columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
            for path in files:
                task = bar.add_task(path.name, total=None)

                def advance(done: int, total: int | None, task: TaskID = task) -> None:
                    bar.update(task, completed=done, total=total)

                run = ingestion_service.import_file(
                    db,
                    warehouse,
                    source_id=source_id,
                    path=path,
                    region=settings.default_phone_region,
                    progress=advance,
                )
                bar.update(task, completed=run.rows_read, total=run.rows_read)
                out.print(
                    f"{path.name}: {run.status}, {run.rows_read} rows read, {run.accepted}"
                    f" accepted, {run.rejected} rejected, {run.duplicates} duplicates"
                    f" in {run.duration_ms} ms"
                )
    finally:
        warehouse.close()
        db.dispose()


def _expand(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if any(c in pattern for c in "*?["):
            anchor = Path(path.anchor) if path.is_absolute() else Path()
            files.extend(sorted(anchor.glob(str(path.relative_to(anchor)))))
        else:
            files.append(path)
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise NotFound(f"no such file: {', '.join(missing) or ' '.join(patterns)}")
    return files


@app.command("sample-data")
@cli_errors
def sample_data(
    customers: Annotated[int, typer.Option(min=1, help="Number of customers")] = DEMO_CUSTOMERS,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same files")] = 42,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default DATA_DIR/sample)")
    ] = None,
) -> None:
    """Generate a realistic multi-channel retail sample data set."""
    from cdp.sample_data import generate

    settings = _settings()
    target = out_dir or settings.data_dir / "sample"
    summary = generate(customers=customers, seed=seed, out=target, progress=console)
    out.print(json.dumps(summary, indent=2, default=str))


@app.command()
@cli_errors
def demo(
    customers: Annotated[int, typer.Option(min=1, help="Sample customers")] = DEMO_CUSTOMERS,
    seed: Annotated[int, typer.Option(help="Sample data seed")] = 42,
    port: Annotated[int | None, typer.Option(help="Port to listen on")] = None,
) -> None:
    """Load the sample data through the platform's connectors and engines, then serve it."""
    from cdp import demo as demo_steps
    from cdp.sample_data import generate, is_generated

    settings = _settings()
    if port:
        settings = Settings(**{**settings.model_dump(), "port": port})
    _prepare_stores(settings)
    sample_dir = settings.data_dir / "sample"
    if is_generated(sample_dir, customers=customers, seed=seed):
        console.print(f"sample data already in {sample_dir}")
    else:
        generate(customers=customers, seed=seed, out=sample_dir, progress=console)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    console.rule("CDP demo")
    demo_steps.run(
        settings,
        sample_dir=sample_dir,
        say=lambda line: console.print(line, soft_wrap=True),
        show=lambda line: out.print(line, soft_wrap=True),
    )


identity_cli.register(
    app, _settings, _open_warehouse, lambda line: out.print(line, soft_wrap=True), cli_errors
)


def main() -> None:
    """Entry point of the `cdp` command."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
