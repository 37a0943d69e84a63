"""HTTP routes of the segments package: computed attributes and segments (role marketer)."""

from __future__ import annotations

from typing import Annotated, Any, get_args

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from cdp.auth import Role, require
from cdp.db import SessionDep
from cdp.deps import SettingsDep, WarehouseDep
from cdp.pagination import Page, PageDep
from segments import service
from segments.compiler import OPS_BY_TYPE
from segments.rules import RULE_ADAPTER, FilterOp
from segments.schemas import (
    AttributeCreate,
    AttributeRead,
    AttributeRefreshRead,
    AttributeUpdate,
    CatalogEventRead,
    CatalogFieldRead,
    CatalogPropertyRead,
    CatalogRead,
    MemberRead,
    PreviewCreate,
    PreviewRead,
    SampleProfile,
    SegmentCreate,
    SegmentEventRead,
    SegmentRead,
    SegmentRefreshRead,
    SegmentUpdate,
    SegmentVersionRead,
)

router = APIRouter(prefix="/api", tags=["segments"], dependencies=[Depends(require(Role.marketer))])

_FILTER_OPS = set(get_args(FilterOp))


def actor(request: Request) -> str | None:
    """The name of the API key making the request."""
    principal = getattr(request.state, "principal", None)
    return None if principal is None else str(principal.name)


ActorDep = Annotated[str | None, Depends(actor)]


def _attribute(info: service.AttributeInfo) -> AttributeRead:
    return AttributeRead(
        name=info.name,
        description=info.description,
        builtin=info.builtin,
        type=info.type,
        definition=info.definition,
        created_at=info.created_at,
        updated_at=info.updated_at,
        updated_by=info.updated_by,
    )


@router.get("/attributes")
def list_attributes(session: SessionDep, settings: SettingsDep) -> list[AttributeRead]:
    """Every computed attribute: the built-ins, then the defined ones."""
    infos = service.list_attributes(session, settings=settings.segments)
    return [_attribute(i) for i in infos]


@router.post("/attributes", status_code=201)
def create_attribute(
    body: AttributeCreate, session: SessionDep, settings: SettingsDep, who: ActorDep
) -> AttributeRead:
    """Define an attribute; it has values after the next refresh."""
    info = service.create_attribute(
        session,
        name=body.name,
        description=body.description,
        definition=body.definition,
        settings=settings.segments,
        actor=who,
    )
    return _attribute(info)


@router.post("/attributes/refresh")
def refresh_attributes(
    session: SessionDep, warehouse: WarehouseDep, settings: SettingsDep
) -> AttributeRefreshRead:
    """Recompute every attribute of every profile now (and the event map and catalogue)."""
    result = service.refresh_derived(session, warehouse, settings=settings.segments)
    return AttributeRefreshRead(
        profiles=result.profiles,
        attributes=result.attributes,
        computed_at=result.computed_at,
        seconds=result.seconds,
    )


@router.get("/attributes/{name}")
def get_attribute(name: str, session: SessionDep, settings: SettingsDep) -> AttributeRead:
    """One attribute."""
    return _attribute(service.get_attribute(session, name=name, settings=settings.segments))


@router.put("/attributes/{name}")
def update_attribute(
    name: str, body: AttributeUpdate, session: SessionDep, settings: SettingsDep, who: ActorDep
) -> AttributeRead:
    """Replace a defined attribute's definition."""
    info = service.update_attribute(
        session,
        name=name,
        description=body.description,
        definition=body.definition,
        settings=settings.segments,
        actor=who,
    )
    return _attribute(info)


@router.delete("/attributes/{name}", status_code=204)
def delete_attribute(name: str, session: SessionDep, settings: SettingsDep) -> None:
    """Remove a defined attribute no segment uses."""
    service.delete_attribute(session, name=name, settings=settings.segments)


@router.get("/segments/catalog")
def get_catalog(session: SessionDep, warehouse: WarehouseDep, settings: SettingsDep) -> CatalogRead:
    """The fields, events and event properties rules may use, with their types and operators."""
    catalog = service.catalog(session, warehouse, settings=settings.segments)
    return CatalogRead(
        fields=[
            CatalogFieldRead(
                name=f.name,
                type=f.type,
                kind=f.kind,
                description=f.description,
                ops=sorted(OPS_BY_TYPE[f.type]),
            )
            for f in sorted(catalog.fields.values(), key=lambda f: f.name)
        ],
        events=[
            CatalogEventRead(
                event=event,
                properties=[
                    CatalogPropertyRead(
                        name=name, type=ftype, ops=sorted(OPS_BY_TYPE[ftype] & _FILTER_OPS)
                    )
                    for name, ftype in sorted(props.items())
                ],
            )
            for event, props in sorted(catalog.events.items())
        ],
    )


@router.get("/segments/rule-schema")
def rule_schema() -> dict[str, Any]:  # Any: JSON schema
    """The JSON schema of the rule language."""
    schema: dict[str, Any] = RULE_ADAPTER.json_schema()  # Any: JSON schema
    return schema


@router.post("/segments/preview")
def preview(
    body: PreviewCreate, session: SessionDep, warehouse: WarehouseDep, settings: SettingsDep
) -> PreviewRead:
    """Count and sample the profiles a rule selects now, without saving it."""
    result = service.preview(
        session, warehouse, rule=body.rule, settings=settings.segments, sample_size=body.sample_size
    )
    return PreviewRead(
        count=result.count,
        sample=[SampleProfile.model_validate(s) for s in result.sample],
        seconds=result.seconds,
    )


@router.get("/segments/events")
def segment_events(
    warehouse: WarehouseDep,
    after_seq: Annotated[int, Query(ge=0, description="Entries and exits after this seq")] = 0,
    segment_id: Annotated[str | None, Query(description="Only this segment")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[SegmentEventRead]:
    """Published entries and exits, in order, for activation."""
    frame = service.segment_events_since(
        warehouse, after_seq=after_seq, segment_id=segment_id, limit=limit
    )
    return [SegmentEventRead.model_validate(r) for r in frame.iter_rows(named=True)]


@router.get("/segments")
def list_segments(session: SessionDep, page: PageDep) -> Page[SegmentRead]:
    """Saved segments by name."""
    rows, total = service.list_segments(session, limit=page.limit, offset=page.offset)
    return Page[SegmentRead].of(
        [SegmentRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.post("/segments", status_code=201)
def create_segment(
    body: SegmentCreate,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    who: ActorDep,
) -> SegmentRead:
    """Save a segment; its members come with its first refresh."""
    row = service.create_segment(
        session,
        warehouse,
        name=body.name,
        description=body.description,
        rule=body.rule,
        refresh_minutes=body.refresh_minutes,
        settings=settings.segments,
        actor=who,
    )
    return SegmentRead.model_validate(row)


@router.get("/segments/{segment_id}")
def get_segment(segment_id: str, session: SessionDep) -> SegmentRead:
    """One saved segment."""
    return SegmentRead.model_validate(service.get_segment(session, segment_id=segment_id))


@router.put("/segments/{segment_id}")
def update_segment(
    segment_id: str,
    body: SegmentUpdate,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    who: ActorDep,
) -> SegmentRead:
    """Change a segment; a new name or rule is a new version."""
    row = service.update_segment(
        session,
        warehouse,
        segment_id=segment_id,
        changes=body.model_dump(exclude_unset=True),
        settings=settings.segments,
        actor=who,
    )
    return SegmentRead.model_validate(row)


@router.delete("/segments/{segment_id}", status_code=204)
def delete_segment(segment_id: str, session: SessionDep, warehouse: WarehouseDep) -> None:
    """Delete a segment no other segment refers to."""
    service.delete_segment(session, warehouse, segment_id=segment_id)


@router.get("/segments/{segment_id}/versions")
def segment_versions(segment_id: str, session: SessionDep) -> list[SegmentVersionRead]:
    """Every version of a segment, newest first."""
    rows = service.segment_versions(session, segment_id=segment_id)
    return [SegmentVersionRead.model_validate(r) for r in rows]


@router.post("/segments/{segment_id}/refresh")
def refresh_segment(
    segment_id: str,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    full: Annotated[
        bool, Query(description="evaluate every profile even where incremental is possible")
    ] = False,
) -> SegmentRefreshRead:
    """Re-evaluate a segment now: store its members and publish entries and exits."""
    result = service.refresh_segment(
        session, warehouse, segment_id=segment_id, settings=settings.segments, full=full
    )
    return SegmentRefreshRead(
        refresh_id=result.refresh_id,
        segment_version=result.version,
        refreshed_at=result.refreshed_at,
        size=result.size,
        entries=result.entries,
        exits=result.exits,
        mode=result.mode,
        evaluated=result.evaluated,
    )


@router.get("/segments/{segment_id}/members")
def segment_members(
    segment_id: str, session: SessionDep, warehouse: WarehouseDep, page: PageDep
) -> Page[MemberRead]:
    """The current members, by profile id."""
    items, total = service.members(
        session, warehouse, segment_id=segment_id, limit=page.limit, offset=page.offset
    )
    return Page[MemberRead].of(
        [MemberRead.model_validate(i) for i in items], total=total, params=page
    )


_MEDIA = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


@router.get("/segments/{segment_id}/export")
def export_segment(
    segment_id: str,
    session: SessionDep,
    warehouse: WarehouseDep,
    format: Annotated[service.ExportFormat, Query(description="csv or parquet")] = "csv",
) -> StreamingResponse:
    """The members with their traits and attributes, streamed as CSV or Parquet."""
    chunks = service.export_members(session, warehouse, segment_id=segment_id, fmt=format)
    return StreamingResponse(
        chunks,
        media_type=_MEDIA[format],
        headers={"Content-Disposition": f'attachment; filename="segment-{segment_id}.{format}"'},
    )


@router.get("/segments/{segment_id}/sizes")
def segment_sizes(
    segment_id: str, session: SessionDep, warehouse: WarehouseDep, page: PageDep
) -> Page[SegmentRefreshRead]:
    """The size of the segment over time (one row per refresh, newest first)."""
    frame, total = service.segment_sizes(
        session, warehouse, segment_id=segment_id, limit=page.limit, offset=page.offset
    )
    return Page[SegmentRefreshRead].of(
        [SegmentRefreshRead.model_validate(r) for r in frame.iter_rows(named=True)],
        total=total,
        params=page,
    )
