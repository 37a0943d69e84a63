"""HTTP routes of the ingestion package: the sources API and the tracking API."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Request, Response, UploadFile

from cdp.auth import Role, require
from cdp.db import Database, SessionDep, get_db
from cdp.deps import SettingsDep, WarehouseDep
from cdp.pagination import Page, PageDep
from ingestion import queries, service
from ingestion.connectors.files import file_format
from ingestion.models import ImportRun
from ingestion.runtime import get_runtime
from ingestion.schemas import (
    ImportRead,
    ImportReport,
    RowError,
    SourceCreate,
    SourceCreated,
    SourceRead,
    SourceStats,
    SourceUpdate,
)

DbDep = Annotated[Database, Depends(get_db)]
MAX_REPORTED_ERRORS = 100

sources = APIRouter(
    prefix="/api/sources", tags=["sources"], dependencies=[Depends(require(Role.data))]
)


@sources.post("", status_code=201)
def create_source(body: SourceCreate, session: SessionDep) -> SourceCreated:
    """Create a source; for `http` sources the response holds the write key, shown once."""
    source, key = service.create_source(
        session, name=body.name, kind=body.kind, config=body.config, mapping=body.mapping
    )
    return service.source_created(source, key)


@sources.get("")
def list_sources(session: SessionDep, page: PageDep) -> Page[SourceRead]:
    """Sources by name."""
    rows, total = service.list_sources(session, limit=page.limit, offset=page.offset)
    return Page[SourceRead].of([service.source_read(r) for r in rows], total=total, params=page)


@sources.get("/{source_id}")
def get_source(source_id: str, session: SessionDep) -> SourceRead:
    """One source."""
    return service.source_read(service.get_source(session, source_id=source_id))


@sources.patch("/{source_id}")
def update_source(source_id: str, body: SourceUpdate, session: SessionDep) -> SourceRead:
    """Change a source's name, config, mapping or enabled state."""
    source = service.update_source(
        session,
        source_id=source_id,
        name=body.name,
        config=body.config,
        mapping=body.mapping,
        enabled=body.enabled,
    )
    return service.source_read(source)


@sources.post("/{source_id}/disable")
def disable_source(source_id: str, session: SessionDep) -> SourceRead:
    """Disable a source: its write key is refused and it is not pulled."""
    return service.source_read(service.update_source(session, source_id=source_id, enabled=False))


@sources.delete("/{source_id}", status_code=204)
def delete_source(source_id: str, session: SessionDep) -> Response:
    """Delete a source and its import records (its events stay in the warehouse)."""
    service.delete_source(session, source_id=source_id)
    return Response(status_code=204)


@sources.post("/{source_id}/write-key")
def rotate_write_key(source_id: str, session: SessionDep) -> SourceCreated:
    """Issue a new write key for an `http` source; the old one stops working."""
    source, key = service.rotate_write_key(session, source_id=source_id)
    return service.source_created(source, key)


@sources.get("/{source_id}/stats")
def source_stats(source_id: str, session: SessionDep, warehouse: WarehouseDep) -> SourceStats:
    """Received, accepted, rejected and duplicate counts, and the latest rejections."""
    return service.source_stats(session, warehouse, source_id=source_id)


@sources.get("/{source_id}/imports")
def list_imports(source_id: str, session: SessionDep, page: PageDep) -> Page[ImportRead]:
    """File imports and database pulls of a source, newest first."""
    rows, total = service.list_imports(
        session, source_id=source_id, limit=page.limit, offset=page.offset
    )
    return Page[ImportRead].of(
        [ImportRead.model_validate(r) for r in rows], total=total, params=page
    )


@sources.get("/{source_id}/imports/{import_id}")
def get_import(
    source_id: str, import_id: str, session: SessionDep, warehouse: WarehouseDep
) -> ImportReport:
    """One import with its first rejected rows."""
    run = service.get_import(session, source_id=source_id, import_id=import_id)
    return _report(run, warehouse)


def _report(run: ImportRun, warehouse: WarehouseDep) -> ImportReport:
    errors = warehouse.run(queries.rejections_of_import(run.id, limit=MAX_REPORTED_ERRORS))
    return ImportReport(
        **ImportRead.model_validate(run).model_dump(),
        errors=[
            RowError(row=r["position"], reason=r["reason"]) for r in errors.iter_rows(named=True)
        ],
    )


@sources.post("/{source_id}/uploads", status_code=202)
def upload_file(
    source_id: str,
    file: Annotated[UploadFile, File(description="A CSV, Parquet or NDJSON file")],
    request: Request,
    response: Response,
    db: DbDep,
    settings: SettingsDep,
) -> ImportRead:
    """Upload a file (streamed to disk) to import into a source, in the background.

    Answers `202` at once with the import record (status `queued`), whose URL is in
    `Location`: poll it for the status, rows read of rows total, progress, accepted,
    rejected and duplicate counts, and, once finished, the first rejected rows.
    """
    name = Path(file.filename or "upload.csv").name
    suffix = Path(name).suffix
    file_format(Path(name))
    upload_dir = settings.data_dir / "uploads"
    upload_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=upload_dir, suffix=suffix, delete=False) as target:
        shutil.copyfileobj(file.file, target, length=1024 * 1024)
        path = Path(target.name)
    try:
        imports = get_runtime(request).imports
        run = service.queue_upload(db, source_id=source_id, path=path, name=name)
        imports.submit(run.id)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    response.headers["Location"] = f"/api/sources/{source_id}/imports/{run.id}"
    return ImportRead.model_validate(run)


@sources.post("/{source_id}/pull", status_code=201)
def pull_source(
    source_id: str, db: DbDep, settings: SettingsDep, warehouse: WarehouseDep
) -> ImportReport:
    """Pull a `database` source's new rows now."""
    run = service.pull_database(
        db, warehouse, source_id=source_id, region=settings.default_phone_region
    )
    return _report(run, warehouse)


tracking = APIRouter(prefix="/v1", tags=["tracking"])


def _tracking_route(endpoint: str) -> None:
    async def track(request: Request) -> Response:
        # The one async route: it only awaits the group commit that makes its events durable.
        return await get_runtime(request).handle(request, endpoint)

    track.__doc__ = f"Segment-compatible `{endpoint}`: write key as the basic-auth username."
    tracking.add_api_route(
        f"/{endpoint}",
        track,
        methods=["POST"],
        name=f"tracking_{endpoint}",
        summary=f"Segment {endpoint}",
        response_class=Response,
    )


for _endpoint in ("identify", "track", "page", "screen", "group", "alias", "batch"):
    _tracking_route(_endpoint)

router = APIRouter(tags=["ingestion"])
router.include_router(sources)
router.include_router(tracking)
