"""HTTP routes of the identity package: profiles, identity explanation, rules, resolution."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from cdp.auth import ADMIN, Principal, Role, require
from cdp.db import SessionDep
from cdp.deps import SettingsDep, WarehouseDep
from cdp.errors import BadRequest
from cdp.pagination import Page, PageDep
from identity import service
from identity.schemas import (
    AuditRead,
    BlockedIdentifierRead,
    BlockReason,
    ConsentCreate,
    ErasureRead,
    EventRead,
    IdentityExplanation,
    OverrideRead,
    ProfileExport,
    ProfileRead,
    ResolveRead,
    RulesRead,
    RulesUpdate,
    UnmergeCreate,
    UnmergeRead,
)

READERS = require(Role.marketer, Role.data, Role.loyalty)
DATA = require(Role.data)

profiles = APIRouter(prefix="/api/profiles", tags=["profiles"], dependencies=[Depends(READERS)])
identity = APIRouter(prefix="/api/identity", tags=["identity"], dependencies=[Depends(DATA)])


def _principal_name(request: Request) -> str | None:
    principal: Principal | None = getattr(request.state, "principal", None)
    return principal.name if principal else None


@profiles.get("/lookup")
def lookup_profile(
    warehouse: WarehouseDep,
    settings: SettingsDep,
    kind: Annotated[str, Query(min_length=1, description="Identifier kind, e.g. email")],
    value: Annotated[str, Query(min_length=1, description="Value as typed; normalised here")],
) -> ProfileRead:
    """The profile holding an identifier (the value is normalised before the lookup)."""
    return service.find_profile(warehouse, settings=settings, kind=kind, value=value)


@profiles.get("")
def search_profiles(
    warehouse: WarehouseDep,
    page: PageDep,
    trait: Annotated[
        list[str] | None,
        Query(description="Filter `name:value` (trait equals value as text); repeatable"),
    ] = None,
    seen_after: Annotated[datetime | None, Query(description="Active at or after")] = None,
) -> Page[ProfileRead]:
    """Search profiles by trait values, latest activity first."""
    filters: dict[str, str] = {}
    for item in trait or []:
        name, sep, wanted = item.partition(":")
        if not sep or not name:
            raise BadRequest(f"trait filter {item!r} is not of the form name:value")
        filters[name] = wanted
    items, total = service.search_profiles(
        warehouse, traits=filters, seen_after=seen_after, limit=page.limit, offset=page.offset
    )
    return Page[ProfileRead].of(items, total=total, params=page)


@profiles.get("/{profile_id}")
def get_profile(profile_id: str, warehouse: WarehouseDep) -> ProfileRead:
    """A profile; a merged-away id answers with the survivor (`redirected: true`)."""
    return service.get_profile(warehouse, profile_id=profile_id)


@profiles.get("/{profile_id}/events")
def list_profile_events(
    profile_id: str,
    warehouse: WarehouseDep,
    page: PageDep,
    event: Annotated[str | None, Query(description="Only events of this name")] = None,
    since: Annotated[datetime | None, Query(description="At or after this time")] = None,
    until: Annotated[datetime | None, Query(description="Before this time")] = None,
) -> Page[EventRead]:
    """The profile's timeline, newest first."""
    items, total = service.profile_events(
        warehouse,
        profile_id=profile_id,
        event=event,
        since=since,
        until=until,
        limit=page.limit,
        offset=page.offset,
    )
    return Page[EventRead].of(items, total=total, params=page)


@profiles.get("/{profile_id}/identity")
def explain_profile_identity(profile_id: str, warehouse: WarehouseDep) -> IdentityExplanation:
    """Why the profile looks as it does: identifiers, links, merges, rule decisions."""
    return service.explain_identity(warehouse, profile_id=profile_id)


@profiles.post("/{profile_id}/unmerge", dependencies=[Depends(ADMIN)])
def unmerge_profile(
    profile_id: str,
    body: UnmergeCreate,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    request: Request,
) -> UnmergeRead:
    """Detach an identifier or remove a link (admin); the profile splits and stays split."""
    return service.unmerge(
        session,
        warehouse,
        settings=settings,
        profile_id=profile_id,
        request=body,
        actor=_principal_name(request),
    )


@profiles.delete("/{profile_id}", dependencies=[Depends(ADMIN)])
def erase_profile(
    profile_id: str, session: SessionDep, warehouse: WarehouseDep, request: Request
) -> ErasureRead:
    """Erase a person (admin): events, identifiers, traits; identifiers are suppressed."""
    return service.erase_profile(
        session, warehouse, profile_id=profile_id, actor=_principal_name(request)
    )


@profiles.get("/{profile_id}/export", dependencies=[Depends(ADMIN)])
def export_profile(
    profile_id: str, session: SessionDep, warehouse: WarehouseDep, request: Request
) -> ProfileExport:
    """Everything held about a person, as JSON (admin)."""
    return service.export_profile(
        session, warehouse, profile_id=profile_id, actor=_principal_name(request)
    )


@identity.post("/consents", status_code=204, dependencies=[Depends(ADMIN)])
def record_consent(
    body: ConsentCreate,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    request: Request,
) -> None:
    """An erased person consented again (admin): their identifier may resolve again."""
    service.allow_identifier(
        session,
        warehouse,
        settings=settings,
        kind=body.kind,
        value=body.value,
        actor=_principal_name(request),
    )


@identity.get("/audit", dependencies=[Depends(ADMIN)])
def list_audit(session: SessionDep, page: PageDep) -> Page[AuditRead]:
    """Privacy operations (erase, export, consent), newest first (admin)."""
    items, total = service.list_audit(session, limit=page.limit, offset=page.offset)
    return Page[AuditRead].of(items, total=total, params=page)


@identity.get("/overrides")
def list_overrides(warehouse: WarehouseDep, page: PageDep) -> Page[OverrideRead]:
    """Unmerge decisions of admins, newest first."""
    items, total = service.list_overrides(warehouse, limit=page.limit, offset=page.offset)
    return Page[OverrideRead].of(items, total=total, params=page)


@identity.get("/blocked")
def list_blocked(
    session: SessionDep,
    warehouse: WarehouseDep,
    page: PageDep,
    kind: Annotated[str | None, Query(min_length=1, description="Only this kind")] = None,
    reason: Annotated[
        BlockReason | None, Query(description="Only `blocked` or only `capped` identifiers")
    ] = None,
) -> Page[BlockedIdentifierRead]:
    """Identifiers the rules leave out of resolution (blocked or capped), most events first."""
    items, total = service.list_blocked(
        session, warehouse, kind=kind, reason=reason, limit=page.limit, offset=page.offset
    )
    return Page[BlockedIdentifierRead].of(items, total=total, params=page)


@identity.delete("/overrides/{override_id}", dependencies=[Depends(ADMIN)])
def allow_again(
    override_id: int,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    request: Request,
) -> ResolveRead:
    """Lift an unmerge decision (admin): the identifier or link links again."""
    return service.allow_again(
        session,
        warehouse,
        settings=settings,
        override_id=override_id,
        actor=_principal_name(request),
    )


@identity.get("/rules")
def get_rules(session: SessionDep) -> RulesRead:
    """The resolution rules in force."""
    return RulesRead.model_validate(service.get_rules(session).model_dump())


@identity.put("/rules")
def put_rules(
    body: RulesUpdate, session: SessionDep, warehouse: WarehouseDep, request: Request
) -> RulesRead:
    """Replace the rules; the next resolution run rebuilds the profiles under them."""
    rules = service.put_rules(
        session,
        warehouse,
        rules=service.IdentityRules.model_validate(body.model_dump()),
        updated_by=_principal_name(request),
    )
    return RulesRead.model_validate(rules.model_dump())


@identity.post("/resolve", dependencies=[Depends(ADMIN)])
def run_resolution(
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    full: Annotated[bool, Query(description="Rebuild everything instead of new events")] = False,
) -> ResolveRead:
    """Resolve now (admin): new events, or a full rebuild with `full=true`."""
    rules = service.get_rules(session)
    result = service.resolve(warehouse, settings=settings, rules=rules, full=full)
    return ResolveRead.model_validate(result.as_dict())


router = APIRouter()
router.include_router(profiles)
router.include_router(identity)
