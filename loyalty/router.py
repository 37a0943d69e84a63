"""HTTP routes of the loyalty package (role `loyalty`, and `admin`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Response, UploadFile

from cdp.auth import Principal, Role, require
from cdp.db import SessionDep, utcnow
from cdp.deps import SettingsDep, WarehouseDep
from cdp.pagination import Page, PageDep
from loyalty import engine, service
from loyalty.idempotency import IdempotencyDep, require_key, run_once
from loyalty.schemas import (
    AdjustmentCreate,
    BalanceRead,
    DryRunRequest,
    DryRunResult,
    EntryKind,
    ExpiringMember,
    ImportResult,
    KpiRead,
    LedgerEntryRead,
    MemberCommand,
    MemberRead,
    MemberStatus,
    MergeCommand,
    MergeResult,
    ProcessResultRead,
    ProgramCreate,
    ProgramRead,
    ProgramStatus,
    ProgramUpdate,
    RedemptionCancel,
    RedemptionCreate,
    RedemptionRead,
    Reevaluation,
    RewardCreate,
    RewardRead,
    RuleCreate,
    RuleRead,
    RuleUpdate,
    TierChangeRead,
    TierCreate,
    TierRead,
)

LOYALTY = require(Role.loyalty)
PrincipalDep = Annotated[Principal, Depends(LOYALTY)]

router = APIRouter(prefix="/api/loyalty", tags=["loyalty"], dependencies=[Depends(LOYALTY)])


@router.post("/programs", status_code=201, response_model=ProgramRead)
def create_program(
    body: ProgramCreate, session: SessionDep, warehouse: WarehouseDep, idem: IdempotencyDep
) -> Response:
    """Create a programme (a draft unless `status` says otherwise)."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=ProgramRead,
        status_code=201,
        run=lambda: ProgramRead.model_validate(
            service.create_program(session, data=body, warehouse=warehouse)
        ),
    )


@router.get("/programs")
def list_programs(
    session: SessionDep, page: PageDep, status: ProgramStatus | None = None
) -> Page[ProgramRead]:
    """List programmes."""
    rows, total = service.list_programs(
        session, status=status, limit=page.limit, offset=page.offset
    )
    return Page[ProgramRead].of(
        [ProgramRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.get("/programs/{program_id}")
def get_program(program_id: str, session: SessionDep) -> ProgramRead:
    """One programme."""
    return ProgramRead.model_validate(service.get_program(session, program_id=program_id))


@router.patch("/programs/{program_id}", status_code=200, response_model=ProgramRead)
def update_program(
    program_id: str,
    body: ProgramUpdate,
    session: SessionDep,
    warehouse: WarehouseDep,
    idem: IdempotencyDep,
) -> Response:
    """Change a programme's settings or status."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json", exclude_unset=True),
        model=ProgramRead,
        status_code=200,
        run=lambda: ProgramRead.model_validate(
            service.update_program(session, program_id=program_id, data=body, warehouse=warehouse)
        ),
    )


@router.post("/programs/{program_id}/members", status_code=200, response_model=MemberRead)
def change_membership(
    program_id: str,
    body: MemberCommand,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    idem: IdempotencyDep,
) -> Response:
    """Enrol, unenrol or opt out a person (`action`), named by profile id or identifier."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=MemberRead,
        status_code=200,
        run=lambda: MemberRead.model_validate(
            service.change_membership_of_person(
                session,
                warehouse,
                settings=settings,
                program_id=program_id,
                action=body.action,
                profile_id=body.profile_id,
                identifier_kind=body.identifier_kind,
                identifier=body.identifier,
                at=body.enrolled_at,
            )
        ),
    )


@router.get("/programs/{program_id}/members")
def list_members(
    program_id: str,
    session: SessionDep,
    page: PageDep,
    status: MemberStatus | None = None,
    profile_id: Annotated[str | None, Query(description="Look a member up by profile")] = None,
) -> Page[MemberRead]:
    """List a programme's members, or find the one of a profile."""
    service.get_program(session, program_id=program_id)
    if profile_id is not None:
        member = service.find_member(session, program_id=program_id, profile_id=profile_id)
        found = [MemberRead.model_validate(member)] if member else []
        return Page[MemberRead].of(found, total=len(found), params=page)
    rows, total = service.list_members(
        session, program_id=program_id, status=status, limit=page.limit, offset=page.offset
    )
    return Page[MemberRead].of(
        [MemberRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.get("/programs/{program_id}/members/lookup", response_model=MemberRead)
def lookup_member(
    program_id: str,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    kind: Annotated[str, Query(description="Identifier kind, e.g. email, phone, loyalty_card")],
    value: Annotated[str, Query(description="Identifier value as typed (normalised here)")],
) -> MemberRead:
    """Find the member of the profile holding any identifier, through identity resolution."""
    service.get_program(session, program_id=program_id)
    member = service.member_by_identifier(
        session, warehouse, settings=settings, program_id=program_id, kind=kind, value=value
    )
    return MemberRead.model_validate(member)


@router.post("/programs/{program_id}/merges", status_code=200, response_model=MergeResult)
def apply_merge(
    program_id: str,
    body: MergeCommand,
    session: SessionDep,
    warehouse: WarehouseDep,
    idem: IdempotencyDep,
) -> Response:
    """Apply one of identity's profile merges (or splits) to the programme's memberships.

    A split (`from` = the profile that lost identifiers, `to` = the piece) moves each entry
    whose earning event identity now gives to the piece.
    """

    def run() -> MergeResult:
        if body.kind == "merge":
            source, target, moved = service.merge_profiles(
                session,
                program_id=program_id,
                from_profile_id=body.from_profile_id,
                to_profile_id=body.to_profile_id,
                reason=body.reason,
            )
        else:
            source, target, moved = service.split_profiles(
                session,
                program_id=program_id,
                from_profile_id=body.from_profile_id,
                to_profile_id=body.to_profile_id,
                event_profiles=lambda ids: service.event_profiles_of(warehouse, event_ids=ids),
                reason=body.reason,
            )
        return MergeResult(
            program_id=program_id,
            kind=body.kind,
            from_member_id=source.id if source else None,
            to_member_id=target.id if target else None,
            points_moved=moved,
        )

    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=MergeResult,
        status_code=200,
        run=run,
    )


@router.get("/members/{member_id}")
def get_member(member_id: str, session: SessionDep) -> MemberRead:
    """One member."""
    return MemberRead.model_validate(service.get_member(session, member_id=member_id))


@router.get("/members/{member_id}/balance")
def get_balance(member_id: str, session: SessionDep) -> BalanceRead:
    """Active, pending and soon-expiring points, qualifying points and tier progress."""
    return service.balance_read(session, member_id=member_id)


@router.get("/members/{member_id}/history")
def get_history(
    member_id: str, session: SessionDep, page: PageDep, kind: EntryKind | None = None
) -> Page[LedgerEntryRead]:
    """The member's ledger, newest first (by when each movement happened)."""
    rows, total = service.history(
        session, member_id=member_id, kind=kind, limit=page.limit, offset=page.offset
    )
    now = utcnow()
    return Page[LedgerEntryRead].of(
        [LedgerEntryRead.at(r, now) for r in rows], total=total, params=page
    )


@router.post("/members/{member_id}/adjustments", status_code=201, response_model=LedgerEntryRead)
def adjust(
    member_id: str,
    body: AdjustmentCreate,
    session: SessionDep,
    idem: IdempotencyDep,
    principal: PrincipalDep,
) -> Response:
    """Credit or debit points by hand; the reason and the API key are recorded."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=LedgerEntryRead,
        status_code=201,
        run=lambda: LedgerEntryRead.model_validate(
            service.adjust_points(
                session,
                member_id=member_id,
                points=body.points,
                reason=body.reason,
                actor=f"api-key:{principal.key_id} ({principal.name})",
                idempotency_key=f"adjust:{idem.scope}:{idem.key}" if idem.key else None,
                qualifying=body.qualifying,
            )
        ),
    )


@router.post("/programs/{program_id}/rewards", status_code=201, response_model=RewardRead)
def create_reward(
    program_id: str, body: RewardCreate, session: SessionDep, idem: IdempotencyDep
) -> Response:
    """Add a reward to the catalogue."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=RewardRead,
        status_code=201,
        run=lambda: RewardRead.model_validate(
            service.create_reward(session, program_id=program_id, data=body)
        ),
    )


@router.get("/programs/{program_id}/rewards")
def list_rewards(program_id: str, session: SessionDep, page: PageDep) -> Page[RewardRead]:
    """The programme's catalogue, cheapest first."""
    service.get_program(session, program_id=program_id)
    rows, total = service.list_rewards(
        session, program_id=program_id, limit=page.limit, offset=page.offset
    )
    return Page[RewardRead].of(
        [RewardRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.get("/rewards/{reward_id}")
def get_reward(reward_id: str, session: SessionDep) -> RewardRead:
    """One reward, with its stock left."""
    return RewardRead.model_validate(service.get_reward(session, reward_id=reward_id))


@router.post("/members/{member_id}/redemptions", status_code=201, response_model=RedemptionRead)
def redeem(
    member_id: str, body: RedemptionCreate, session: SessionDep, idem: IdempotencyDep
) -> Response:
    """Redeem a reward (an `Idempotency-Key` is required: a retry never redeems twice)."""
    require_key(idem)
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=RedemptionRead,
        status_code=201,
        run=lambda: RedemptionRead.model_validate(
            service.redeem(session, member_id=member_id, reward_id=body.reward_id)
        ),
    )


@router.get("/members/{member_id}/redemptions")
def list_redemptions(member_id: str, session: SessionDep, page: PageDep) -> Page[RedemptionRead]:
    """The member's redemptions, newest first."""
    service.get_member(session, member_id=member_id)
    rows, total = service.list_redemptions(
        session, member_id=member_id, limit=page.limit, offset=page.offset
    )
    return Page[RedemptionRead].of(
        [RedemptionRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.post("/redemptions/{redemption_id}/cancel", status_code=200, response_model=RedemptionRead)
def cancel_redemption(
    redemption_id: str,
    session: SessionDep,
    idem: IdempotencyDep,
    principal: PrincipalDep,
    body: RedemptionCancel | None = None,
) -> Response:
    """Cancel a redemption (optional body: `reason`); its points go back to their lots."""
    body = body or RedemptionCancel()
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=RedemptionRead,
        status_code=200,
        run=lambda: RedemptionRead.model_validate(
            service.cancel_redemption(
                session,
                redemption_id=redemption_id,
                reason=body.reason,
                actor=f"api-key:{principal.key_id} ({principal.name})",
            )
        ),
    )


@router.post("/programs/{program_id}/rules", status_code=201, response_model=RuleRead)
def create_rule(
    program_id: str, body: RuleCreate, session: SessionDep, idem: IdempotencyDep
) -> Response:
    """Add an earning rule."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=RuleRead,
        status_code=201,
        run=lambda: RuleRead.model_validate(
            service.create_rule(session, program_id=program_id, data=body)
        ),
    )


@router.get("/programs/{program_id}/rules")
def list_rules(program_id: str, session: SessionDep, page: PageDep) -> Page[RuleRead]:
    """The programme's rules in stacking order."""
    service.get_program(session, program_id=program_id)
    rows, total = service.list_rules(
        session, program_id=program_id, limit=page.limit, offset=page.offset
    )
    return Page[RuleRead].of([RuleRead.model_validate(r) for r in rows], total=total, params=page)


@router.get("/rules/{rule_id}")
def get_rule(rule_id: str, session: SessionDep) -> RuleRead:
    """One rule."""
    return RuleRead.model_validate(service.get_rule(session, rule_id=rule_id))


@router.patch("/rules/{rule_id}", status_code=200, response_model=RuleRead)
def update_rule(
    rule_id: str, body: RuleUpdate, session: SessionDep, idem: IdempotencyDep
) -> Response:
    """Change a rule (activate, deactivate, edit)."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json", exclude_unset=True),
        model=RuleRead,
        status_code=200,
        run=lambda: RuleRead.model_validate(
            service.update_rule(session, rule_id=rule_id, data=body)
        ),
    )


@router.post("/programs/{program_id}/dry-run")
def dry_run(
    program_id: str, body: DryRunRequest, session: SessionDep, warehouse: WarehouseDep
) -> DryRunResult:
    """Evaluate rules against a sample event and member; explains each verdict, writes nothing."""
    return service.dry_run(session, program_id=program_id, request=body, warehouse=warehouse)


def _processed(result: engine.ProcessResult, mark: int) -> ProcessResultRead:
    return ProcessResultRead(
        events=result.events,
        enrolled=result.enrolled,
        credits=result.credits,
        points=result.points,
        reversals=result.reversals,
        last_event_id=mark,
    )


@router.post("/programs/{program_id}/backfill", status_code=200, response_model=ProcessResultRead)
def backfill(
    program_id: str, session: SessionDep, warehouse: WarehouseDep, idem: IdempotencyDep
) -> Response:
    """Award points over the whole event history, set-based (idempotent)."""
    return run_once(
        session,
        idem=idem,
        body={},
        model=ProcessResultRead,
        status_code=200,
        run=lambda: _processed(*service.backfill(session, warehouse, program_id=program_id)),
    )


@router.post("/programs/{program_id}/sync", status_code=200, response_model=ProcessResultRead)
def sync(
    program_id: str, session: SessionDep, warehouse: WarehouseDep, idem: IdempotencyDep
) -> Response:
    """Process the events loaded since the programme's high-water mark now."""

    def run() -> ProcessResultRead:
        result, mark = service.sync_program(session, warehouse, program_id=program_id)
        service.publish_member_snapshot(session, warehouse, members=result.members)
        return _processed(result, mark)

    return run_once(
        session,
        idem=idem,
        body={},
        model=ProcessResultRead,
        status_code=200,
        run=run,
    )


@router.post("/programs/{program_id}/tiers", status_code=201, response_model=TierRead)
def create_tier(
    program_id: str, body: TierCreate, session: SessionDep, idem: IdempotencyDep
) -> Response:
    """Add a tier to the ladder."""
    return run_once(
        session,
        idem=idem,
        body=body.model_dump(mode="json"),
        model=TierRead,
        status_code=201,
        run=lambda: TierRead.model_validate(
            service.create_tier(session, program_id=program_id, data=body)
        ),
    )


@router.get("/programs/{program_id}/tiers")
def list_tiers(program_id: str, session: SessionDep) -> list[TierRead]:
    """The ladder, lowest tier first."""
    return [TierRead.model_validate(t) for t in service.list_tiers(session, program_id=program_id)]


@router.post(
    "/programs/{program_id}/tiers/reevaluate", status_code=200, response_model=Reevaluation
)
def reevaluate_tiers(program_id: str, session: SessionDep, idem: IdempotencyDep) -> Response:
    """Re-evaluate every member now (upgrades, and downgrades past the grace period)."""

    def run() -> Reevaluation:
        moves = service.reevaluate_tiers(session, program_id=program_id)
        return Reevaluation(
            upgrades=sum(m.reason == "upgrade" for m in moves),
            downgrades=sum(m.reason == "downgrade" for m in moves),
            members=[m.member_id for m in moves],
        )

    return run_once(session, idem=idem, body={}, model=Reevaluation, run=run)


@router.get("/programs/{program_id}/tier-changes")
def list_tier_changes(
    program_id: str,
    session: SessionDep,
    page: PageDep,
    since: Annotated[datetime, Query(description="Recorded at or after (inclusive)")],
    after_id: Annotated[
        str | None,
        Query(description="With `since` = its recorded_at: start after this change"),
    ] = None,
) -> Page[TierChangeRead]:
    """Tier movements recorded since an instant, oldest recorded first, for activation."""
    rows, total = service.tier_changes(
        session,
        program_id=program_id,
        since=since,
        after_id=after_id,
        limit=page.limit,
        offset=page.offset,
    )
    return Page[TierChangeRead].of(
        [TierChangeRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.get("/members/{member_id}/tiers")
def member_tier_history(member_id: str, session: SessionDep) -> list[TierChangeRead]:
    """A member's tier history, oldest first."""
    return [
        TierChangeRead.model_validate(c) for c in service.tier_history(session, member_id=member_id)
    ]


@router.get("/programs/{program_id}/expiring")
def list_expiring(
    program_id: str,
    session: SessionDep,
    page: PageDep,
    days: Annotated[int, Query(ge=1, le=366)] = 30,
) -> Page[ExpiringMember]:
    """Members with points expiring within `days` (for reminders), soonest first, paginated."""
    rows, total = service.expiring_page(
        session, program_id=program_id, days=days, limit=page.limit, offset=page.offset
    )
    items = [
        ExpiringMember(member_id=m, profile_id=p, points=n, first_expiry=e) for m, p, n, e in rows
    ]
    return Page[ExpiringMember].of(items, total=total, params=page)


@router.post("/programs/{program_id}/imports", status_code=200, response_model=ImportResult)
def import_balances(
    program_id: str,
    session: SessionDep,
    warehouse: WarehouseDep,
    settings: SettingsDep,
    idem: IdempotencyDep,
    file: Annotated[
        UploadFile,
        File(
            description="CSV: balance, profile_id or identifier_kind + identifier"
            "[, expires_at, tier, enrolled_at]"
        ),
    ],
) -> Response:
    """Import opening balances from a CSV file; importing the same rows again changes nothing.

    Each row names its member by `profile_id` or by an identifier the old system knew
    (`identifier_kind`, `identifier`: e.g. `loyalty_card`, `email`)."""
    content = file.file.read()
    return run_once(
        session,
        idem=idem,
        body={"file": content.decode("utf-8", errors="replace")},
        model=ImportResult,
        run=lambda: service.import_opening_balances(
            session, warehouse, settings=settings, program_id=program_id, content=content
        ),
    )


@router.get("/programs/{program_id}/kpis")
def program_kpis(program_id: str, session: SessionDep, warehouse: WarehouseDep) -> KpiRead:
    """Programme KPIs: members, points flows, liability, breakage, tiers, members vs not."""
    return service.kpis(session, warehouse, program_id=program_id)
