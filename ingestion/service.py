"""Use cases of the ingestion package: sources, write keys, stats, imports and pulls.

Other packages may import this module only. What they usually need:
`high_water_mark(warehouse)` (events with `event_id` above a mark are new) and, for the demo
or scripts, `create_source(...)`, `import_file(...)` and `pull_database(...)`. Identifier
normalisation lives in `cdp.identifiers` so every layer can use it without importing us.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session

from cdp.auth import hash_key
from cdp.db import Database, new_id, utcnow
from cdp.pagination import paginate
from cdp.warehouse import Warehouse
from ingestion import queries
from ingestion.connectors import database, files
from ingestion.errors import (
    DuplicateSourceName,
    ImportNotFound,
    InvalidMapping,
    SourceNotFound,
    WrongSourceKind,
)
from ingestion.loader import Loader, loader_for
from ingestion.models import ImportRun, Source
from ingestion.schemas import (
    DatabaseConfig,
    EmptyConfig,
    Mapping,
    RejectionRead,
    SourceCreated,
    SourceKind,
    SourceRead,
    SourceStats,
)
from ingestion.tracking import SourceInfo, source_paths

logger = logging.getLogger(__name__)

WRITE_KEY_PREFIX = "wk_"
RECENT_ERRORS = 20

# Bumped on every change to a source, so the tracking API's write-key cache never serves a
# disabled or rotated source for longer than its short TTL.
_generation = 0


def generation() -> int:
    """The current version of the source configuration in this process."""
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def _new_write_key() -> tuple[str, str]:
    prefix = secrets.token_hex(4)
    return prefix, f"{WRITE_KEY_PREFIX}{prefix}_{secrets.token_urlsafe(24)}"


def _validated_config(kind: str, config: dict[str, object]) -> dict[str, Any]:  # Any: JSON
    model = DatabaseConfig if kind == "database" else EmptyConfig
    try:
        parsed = model.model_validate(config)
    except ValidationError as exc:
        raise InvalidMapping(
            f"invalid {kind} source config: {exc.errors()[0]['msg']}",
            details=[
                {"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)
            ],
        ) from None
    if isinstance(parsed, DatabaseConfig):
        try:
            make_url(parsed.url)
        except ArgumentError:
            raise InvalidMapping("config.url is not a SQLAlchemy URL") from None
    return parsed.model_dump(mode="json", by_alias=True, exclude_none=True)


def _check_columns(mapping: Mapping, columns: Sequence[str] | None) -> None:
    if columns is None:
        return
    missing = sorted(mapping.columns() - set(columns))
    if missing:
        raise InvalidMapping(
            f"the mapping reads columns the source's files do not have: {', '.join(missing)}",
            details={"missing": missing, "columns": list(columns)},
        )


def _check_name(session: Session, name: str, source_id: str | None = None) -> None:
    clash = session.scalar(select(Source).where(Source.name == name))
    if clash is not None and clash.id != source_id:
        raise DuplicateSourceName(f"a source named {name!r} exists already")


def create_source(
    session: Session,
    *,
    name: str,
    kind: SourceKind,
    config: dict[str, object] | None = None,
    mapping: Mapping | None = None,
) -> tuple[Source, str | None]:
    """Create a source; returns it and, for `http` sources, its write key shown once."""
    _check_name(session, name)
    mapping = mapping or Mapping()
    source = Source(
        id=new_id(),
        name=name,
        kind=kind,
        config=_validated_config(kind, config or {}),
        mapping=mapping.model_dump(mode="json", exclude_none=True),
        enabled=True,
        created_at=utcnow(),
        updated_at=utcnow(),
    )
    clear: str | None = None
    if kind == "http":
        prefix, clear = _new_write_key()
        source.write_key_prefix = prefix
        source.write_key_hash = hash_key(clear)
    session.add(source)
    session.flush()
    _changed()
    logger.info("source created", extra={"source_id": source.id, "kind": kind})
    return source, clear


def list_sources(session: Session, *, limit: int, offset: int) -> tuple[list[Source], int]:
    """Sources by name, with the total count."""
    total = session.scalar(select(func.count()).select_from(Source)) or 0
    rows = session.scalars(select(Source).order_by(Source.name).limit(limit).offset(offset))
    return list(rows), total


def get_source(session: Session, *, source_id: str) -> Source:
    """The source with this id, or SourceNotFound."""
    source = session.get(Source, source_id)
    if source is None:
        raise SourceNotFound(f"source {source_id} does not exist")
    return source


def find_source_by_name(session: Session, *, name: str) -> Source | None:
    """The source with this name, if any."""
    return session.scalar(select(Source).where(Source.name == name))


def update_source(
    session: Session,
    *,
    source_id: str,
    name: str | None = None,
    config: dict[str, object] | None = None,
    mapping: Mapping | None = None,
    enabled: bool | None = None,
) -> Source:
    """Change a source's name, config, mapping or state; the mapping is checked on save."""
    source = get_source(session, source_id=source_id)
    if name is not None and name != source.name:
        _check_name(session, name, source.id)
        source.name = name
    if config is not None:
        source.config = _validated_config(source.kind, config)
    if mapping is not None:
        _check_columns(mapping, source.columns)
        source.mapping = mapping.model_dump(mode="json", exclude_none=True)
    if enabled is not None:
        source.enabled = enabled
    source.updated_at = utcnow()
    _changed()
    return source


def delete_source(session: Session, *, source_id: str) -> None:
    """Delete a source and its import records; its events stay in the warehouse."""
    session.delete(get_source(session, source_id=source_id))
    session.flush()
    _changed()


def rotate_write_key(session: Session, *, source_id: str) -> tuple[Source, str]:
    """Issue a new write key for an `http` source; the old one stops working."""
    source = get_source(session, source_id=source_id)
    if source.kind != "http":
        raise WrongSourceKind(f"source {source.name} is a {source.kind} source: no write key")
    prefix, clear = _new_write_key()
    source.write_key_prefix = prefix
    source.write_key_hash = hash_key(clear)
    source.updated_at = utcnow()
    _changed()
    return source, clear


def source_info(source: Source) -> SourceInfo:
    """The hot path's view of a source."""
    paths, composites = source_paths(list(source.mapping.get("identifiers", [])))
    return SourceInfo(id=source.id, enabled=source.enabled, paths=paths, composites=composites)


def find_source_by_write_key(session: Session, *, write_key: str) -> SourceInfo | None:
    """The `http` source this write key belongs to, if any (enabled or not)."""
    source = session.scalar(select(Source).where(Source.write_key_hash == hash_key(write_key)))
    if source is None or source.kind != "http":
        return None
    return source_info(source)


def source_read(source: Source) -> SourceRead:
    """A source as the API shows it: database passwords masked."""
    config = dict(source.config)
    if isinstance(config.get("url"), str):
        config["url"] = make_url(config["url"]).render_as_string(hide_password=True)
    return SourceRead(
        id=source.id,
        name=source.name,
        kind=source.kind,
        enabled=source.enabled,
        config=config,
        mapping=Mapping.model_validate(source.mapping),
        write_key_prefix=source.write_key_prefix,
        columns=source.columns,
        cursor_value=source.cursor_value,
        last_pull_at=source.last_pull_at,
        created_at=source.created_at,
        updated_at=source.updated_at,
    )


def source_created(source: Source, write_key: str | None) -> SourceCreated:
    """A source with its write key, shown once."""
    return SourceCreated(**source_read(source).model_dump(), write_key=write_key)


def source_stats(
    session: Session, warehouse: Warehouse, *, source_id: str, recent: int = RECENT_ERRORS
) -> SourceStats:
    """Received, accepted, rejected and duplicate counts of a source, and its latest errors."""
    get_source(session, source_id=source_id)
    stats = warehouse.run(queries.source_stats(source_id)).row(0, named=True)
    errors = warehouse.run(queries.recent_rejections(source_id, limit=recent))
    return SourceStats(
        received=int(stats["received"]),
        accepted=int(stats["accepted"]),
        rejected=int(stats["rejected"]),
        duplicates=int(stats["duplicates"]),
        identifiers_dropped=int(stats["identifiers_dropped"]),
        last_event_at=_utc(stats["last_event_at"]),
        recent_errors=[
            RejectionRead(**{**row, "rejected_at": _utc(row["rejected_at"])})
            for row in errors.iter_rows(named=True)
        ],
    )


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def high_water_mark(warehouse: Warehouse) -> int:
    """The highest committed event id: events with a greater id are new to the reader."""
    return int(warehouse.scalar(queries.high_water_mark()))


def loader(warehouse: Warehouse) -> Loader:
    """The one loader of this warehouse in this process."""
    return loader_for(warehouse)


def list_imports(
    session: Session, *, source_id: str, limit: int, offset: int
) -> tuple[list[ImportRun], int]:
    """Imports and pulls of a source, newest first."""
    get_source(session, source_id=source_id)
    query = select(ImportRun).where(ImportRun.source_id == source_id)
    return paginate(
        session, query, ImportRun.started_at.desc(), ImportRun.id, limit=limit, offset=offset
    )


def get_import(session: Session, *, source_id: str, import_id: str) -> ImportRun:
    """One import of a source, or ImportNotFound."""
    run = session.get(ImportRun, import_id)
    if run is None or run.source_id != source_id:
        raise ImportNotFound(f"import {import_id} does not exist")
    return run


def import_file(
    db: Database,
    warehouse: Warehouse,
    *,
    source_id: str,
    path: Path,
    region: str,
    name: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    chunk_rows: int = files.CHUNK_ROWS,
) -> ImportRun:
    """Import one CSV, Parquet or NDJSON file into a `file` (or `http`) source.

    Takes the Database rather than a session: an import records its progress in its own
    short transactions while it runs, so the record is visible before it ends.
    """
    return files.import_file(
        db,
        warehouse,
        source_id=source_id,
        path=path,
        region=region,
        name=name,
        progress=progress,
        chunk_rows=chunk_rows,
    )


def queue_upload(db: Database, *, source_id: str, path: Path, name: str) -> ImportRun:
    """Record an uploaded file's import as `queued` (the server's import worker runs it)."""
    return files.queue_import(db, source_id=source_id, name=name, file_path=path)


def pull_database(db: Database, warehouse: Warehouse, *, source_id: str, region: str) -> ImportRun:
    """Pull the new rows of a `database` source now (see connectors.database)."""
    return database.pull(db, warehouse, source_id=source_id, region=region)
