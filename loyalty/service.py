"""Use cases of the loyalty engine; the only module other packages may import."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import polars as pl
from sqlalchemy import (
    Date,
    Float,
    Select,
    String,
    case,
    cast,
    delete,
    false,
    func,
    literal,
    null,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased

from cdp.config import Settings
from cdp.db import all_rows, as_utc, frame_of, new_id, utcnow
from cdp.identifiers import normalise
from cdp.pagination import paginate
from cdp.warehouse import Warehouse
from identity import service as identity_service
from loyalty import calendar, engine, ledger, queries, rules, tiers
from loyalty import status as statuses
from loyalty.errors import (
    AlreadyMember,
    InvalidIdentifier,
    InvalidImport,
    InvalidProgram,
    InvalidRule,
    InvalidStatusChange,
    MemberNotActive,
    MemberNotFound,
    OutOfStock,
    ProgramNotActive,
    ProgramNotFound,
    RedemptionAlreadyCancelled,
    RedemptionLimitReached,
    RedemptionNotFound,
    RewardNotAvailable,
    RewardNotFound,
    RuleNotFound,
    TierNotFound,
    UnknownIdentifier,
    UnknownProfile,
)
from loyalty.ledger import BalanceView, Credit
from loyalty.models import (
    Activity,
    IdempotencyRecord,
    LedgerEntry,
    Lot,
    Member,
    MemberMerge,
    Program,
    Redemption,
    Reward,
    Rule,
    Tier,
    TierChange,
)
from loyalty.schemas import (
    BalanceRead,
    CountAt,
    DryRunRequest,
    DryRunResult,
    ExpiringRead,
    ImportResult,
    ImportRowError,
    KpiRead,
    LedgerEntryRead,
    MemberAction,
    MemberRead,
    ProgramCreate,
    ProgramStatus,
    ProgramUpdate,
    RedemptionRead,
    RewardCreate,
    RuleCreate,
    RuleUpdate,
    RuleVerdict,
    SampleMember,
    TierChangeRead,
    TierCreate,
    TierProgress,
)
from segments import service as segments_service

logger = logging.getLogger(__name__)

# Loyalty's fields in the segment catalogue (`loyalty.tier = "Gold"`, `loyalty.balance`, ...),
# read from the member snapshot this package publishes to the warehouse.
LOYALTY_FIELDS = segments_service.FieldSource(
    name="loyalty",
    relation_sql=queries.MEMBER_FIELDS_RELATION,
    fields={
        "tier": "string",
        "balance": "integer",
        "enrolled": "boolean",
        "enrolled_at": "timestamp",
    },
    description="loyalty membership (oldest programme of the profile), as last published",
)


def _rule_reads(session: Session) -> dict[str, segments_service.Reads]:
    """What each earning rule of a programme not ended reads of segments (saved segments
    by id, computed attributes by name), named `programme / rule`."""
    found: dict[str, segments_service.Reads] = {}
    rows = session.execute(
        select(Program.name, Rule.name, Rule.condition)
        .join(Program, Program.id == Rule.program_id)
        .where(Program.status != "ended", Rule.condition.is_not(None))
    )
    for program_name, rule_name, condition in rows:
        needs = rules.ProfileNeeds.of([rules.parse_condition(condition)])
        if needs.segments or needs.attributes:
            found[f"{program_name} / {rule_name}"] = segments_service.Reads(
                segments=needs.segments, attributes=needs.attributes
            )
    return found


def register_segment_fields() -> None:
    """Add loyalty's fields to the segment field catalogue, and its earning rules as readers
    of segments and attributes (so neither is deleted from under a rule). Done at import;
    idempotent."""
    segments_service.register_field_source(LOYALTY_FIELDS)
    segments_service.register_reader("loyalty_rules", _rule_reads)


register_segment_fields()

STATUS_CHANGES: dict[str, frozenset[str]] = {
    "draft": frozenset({"active", "ended"}),
    "active": frozenset({"paused", "ended"}),
    "paused": frozenset({"active", "ended"}),
    "ended": frozenset(),
}


def create_program(
    session: Session, *, data: ProgramCreate, warehouse: Warehouse | None = None
) -> Program:
    """Create a programme. One created active without `earn_history` starts at the present
    (the warehouse says where that is)."""
    calendar.zone(data.timezone)
    program = Program(**data.model_dump(), created_at=utcnow(), updated_at=utcnow())
    if program.status == "active":
        _activated(program, warehouse)
    session.add(program)
    session.flush()
    logger.info("loyalty programme created", extra={"program_id": program.id})
    return program


def find_program(session: Session, *, program_id: str) -> Program | None:
    """The programme with this id, or None."""
    return session.get(Program, program_id)


def get_program(session: Session, *, program_id: str) -> Program:
    """The programme with this id, or ProgramNotFound."""
    program = find_program(session, program_id=program_id)
    if program is None:
        raise ProgramNotFound(f"programme {program_id} does not exist")
    return program


def list_programs(
    session: Session, *, status: str | None = None, limit: int, offset: int
) -> tuple[list[Program], int]:
    """Programmes, oldest first, with the total count."""
    query = select(Program)
    if status is not None:
        query = query.where(Program.status == status)
    return paginate(session, query, Program.created_at, Program.id, limit=limit, offset=offset)


def _activated(program: Program, warehouse: Warehouse | None) -> None:
    """A programme becomes active: without `earn_history`, its mark moves to the events
    resolved now, so what was loaded before (or during a pause) does not earn in real time."""
    if program.earn_history:
        return
    if warehouse is None:
        raise ValueError("activating a programme without earn_history needs the warehouse")
    program.last_event_id = max(program.last_event_id or 0, _resolved_up_to(warehouse))


def update_program(
    session: Session, *, program_id: str, data: ProgramUpdate, warehouse: Warehouse | None = None
) -> Program:
    """Change a programme's settings or status (draft → active ⇄ paused → ended)."""
    program = get_program(session, program_id=program_id)
    changes = data.model_dump(exclude_unset=True)
    status = changes.pop("status", None)
    if program.status == "ended" and changes:
        raise ProgramNotActive("an ended programme cannot be changed")
    if "timezone" in changes and changes["timezone"] is not None:
        calendar.zone(changes["timezone"])
    for name, value in changes.items():
        if value is None and name not in {"expiry_months"}:
            continue
        setattr(program, name, value)
    problem = calendar.expiry_problem(program.expiry_policy, program.expiry_months)
    if problem is not None:
        raise InvalidProgram(problem)
    if status is not None and status != program.status:
        if status not in STATUS_CHANGES[program.status]:
            raise InvalidStatusChange(
                f"a programme cannot go from {program.status} to {status}",
                details={"from": program.status, "to": status},
            )
        program.status = status
        if status == "active":
            _activated(program, warehouse)
    program.updated_at = utcnow()
    session.flush()
    return program


def find_member(session: Session, *, program_id: str, profile_id: str) -> Member | None:
    """The membership of a profile in a programme, if any."""
    return session.scalar(
        select(Member).where(Member.program_id == program_id, Member.profile_id == profile_id)
    )


def get_member(session: Session, *, member_id: str) -> Member:
    """The member with this id, or MemberNotFound."""
    member = session.get(Member, member_id)
    if member is None:
        raise MemberNotFound(f"member {member_id} does not exist")
    return member


def member_by_profile(session: Session, *, program_id: str, profile_id: str) -> Member:
    """The membership of a profile, or MemberNotFound."""
    member = find_member(session, program_id=program_id, profile_id=profile_id)
    if member is None:
        raise MemberNotFound(f"profile {profile_id} is not a member of programme {program_id}")
    return member


def list_members(
    session: Session, *, program_id: str, status: str | None = None, limit: int, offset: int
) -> tuple[list[Member], int]:
    """Members of a programme, in enrolment order, with the total count."""
    query = select(Member).where(Member.program_id == program_id)
    if status is not None:
        query = query.where(Member.status == status)
    return paginate(session, query, Member.enrolled_at, Member.id, limit=limit, offset=offset)


def change_membership(
    session: Session,
    *,
    program_id: str,
    profile_id: str,
    action: MemberAction,
    at: datetime | None = None,
    now: datetime | None = None,
) -> Member:
    """Enrol, unenrol or opt out a profile.

    Enrolling a profile that left re-activates its membership with its ledger intact;
    enrolling an active member is a conflict. Unenrolled and opted-out members keep their
    points but neither earn nor redeem, and events dated while they were away earn nothing
    even once they are back (the change is recorded with its time, `now`; `at` dates a
    first enrolment only).
    """
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    member = find_member(session, program_id=program_id, profile_id=profile_id)
    if action == "enrol":
        if program.status not in {"active", "draft", "paused"}:
            raise ProgramNotActive(f"programme {program_id} is {program.status}")
        if member is None:
            member = Member(
                program_id=program_id,
                profile_id=profile_id,
                status="active",
                enrolled_at=at or now,
                status_changed_at=now,
            )
            session.add(member)
            session.flush()
            statuses.record(
                session, member=member, status="active", at=member.enrolled_at, reason="enrol"
            )
            session.flush()
            return member
        if member.status == "active":
            raise AlreadyMember(f"profile {profile_id} is already a member")
        if member.status == "merged":
            raise MemberNotActive("this membership was merged into another one")
        member.status = "active"
        member.status_changed_at = now
        statuses.record(session, member=member, status="active", at=now, reason="enrol")
        session.flush()
        return member
    if member is None:
        raise MemberNotFound(f"profile {profile_id} is not a member of programme {program_id}")
    target = "unenrolled" if action == "unenrol" else "opted_out"
    if member.status != target:
        if member.status == "merged":
            raise MemberNotActive("this membership was merged into another one")
        member.status = target
        member.status_changed_at = now
        statuses.record(session, member=member, status=target, at=now, reason=action)
        session.flush()
    return member


def change_membership_of_person(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    program_id: str,
    action: MemberAction,
    profile_id: str | None = None,
    identifier_kind: str | None = None,
    identifier: str | None = None,
    at: datetime | None = None,
    now: datetime | None = None,
) -> Member:
    """Enrol, unenrol or opt out a person a client names (the API's path), through identity.

    The person is a `profile_id` followed through merges (a merged-away id acts on its
    survivor, since loyalty applied that merge already and would never move a membership
    made on the dead id), or the profile holding `identifier_kind` + `identifier`. Enrolling
    an id identity never issued is UnknownProfile: no event would ever resolve to it;
    unenrolling or opting out one acts on the id as given (no member, or a membership made
    before this check). An identifier no profile holds is UnknownIdentifier (identity may
    not have resolved it yet), one that cannot be normalised InvalidIdentifier. Internal
    callers (automatic enrolment, imports) call `change_membership` with ids they trust.
    """
    get_program(session, program_id=program_id)
    if profile_id is not None and identifier_kind is None and identifier is None:
        [live] = identity_service.live_profile_ids(warehouse, profile_ids=[profile_id])
        if live is None and action == "enrol":
            raise UnknownProfile(
                f"profile {profile_id} does not exist: identity never issued this id"
            )
        if (
            live is not None
            and action == "enrol"
            and not identity_service.has_data(warehouse, profile_id=live)
        ):
            # Erased (loyalty already anonymised its memberships and would not again), or
            # every identifier blocked: no event resolves to it.
            raise UnknownProfile(
                f"profile {live} holds nothing: it was erased, or all its identifiers are"
                " blocked or capped"
            )
        profile = live or profile_id
    elif profile_id is None and identifier_kind is not None and identifier is not None:
        profile = _identifier_profile(
            warehouse, settings=settings, kind=identifier_kind, value=identifier
        )
    else:
        raise TypeError("name the person by profile_id or by identifier_kind + identifier")
    return change_membership(
        session, program_id=program_id, profile_id=profile, action=action, at=at, now=now
    )


def _identifier_profile(warehouse: Warehouse, *, settings: Settings, kind: str, value: str) -> str:
    """The live profile holding an identifier given as typed, or a domain error saying why
    there is none."""
    normalised = normalise(kind, value, region=settings.default_phone_region)
    if normalised is None:
        raise InvalidIdentifier(f"{value!r} is not a usable {kind}")
    profile = identity_service.lookup(warehouse, kind=kind, value=normalised)
    if profile is not None:
        return profile
    raise UnknownIdentifier(
        f"no profile holds {kind} {normalised!r}: identity may not have resolved it yet"
        " (resolution runs every few seconds), so retry shortly if it was just sent"
    )


def require_active_member(session: Session, *, member_id: str) -> tuple[Program, Member]:
    """The member and its programme, when both accept activity."""
    member = get_member(session, member_id=member_id)
    program = get_program(session, program_id=member.program_id)
    if program.status != "active":
        raise ProgramNotActive(f"programme {program.id} is {program.status}")
    if member.status != "active":
        raise MemberNotActive(f"member {member.id} is {member.status}")
    return program, member


def adjust_points(
    session: Session,
    *,
    member_id: str,
    points: int,
    reason: str,
    actor: str,
    idempotency_key: str | None = None,
    qualifying: bool = False,
    now: datetime | None = None,
) -> LedgerEntry:
    """A manual credit or debit, with its reason and author kept on the entry (the audit)."""
    member = get_member(session, member_id=member_id)
    program = get_program(session, program_id=member.program_id)
    now = now or utcnow()
    idempotency_key = idempotency_key or f"adjust:{new_id()}"
    if points > 0:
        entry = ledger.credit(
            session,
            program=program,
            credit=Credit(
                member_id=member.id,
                kind="adjust",
                points=points,
                qualifying_points=points if qualifying else 0,
                occurred_at=now,
                idempotency_key=idempotency_key,
                reason=reason,
                actor=actor,
                pending=False,
            ),
            now=now,
        )
        if qualifying:
            tiers.evaluate(session, program=program, member_ids=[member.id], now=now)
        return entry
    ledger.lock_member(session, member_id=member.id)
    return ledger.debit(
        session,
        program=program,
        member_id=member.id,
        kind="adjust",
        points=-points,
        qualifying_points=points if qualifying else 0,
        idempotency_key=idempotency_key,
        now=now,
        reason=reason,
        actor=actor,
    )


def member_balance(
    session: Session, *, member_id: str, now: datetime | None = None
) -> tuple[Member, BalanceView]:
    """A member and its balance at an instant."""
    member = get_member(session, member_id=member_id)
    program = get_program(session, program_id=member.program_id)
    return member, ledger.balance(session, program=program, member_id=member.id, now=now)


def balance_read(session: Session, *, member_id: str) -> BalanceRead:
    """The balance document of the API: active, pending and soon-expiring points, qualifying
    points and tier progress."""
    member, view = member_balance(session, member_id=member_id)
    return BalanceRead(
        member_id=member.id,
        active=view.active,
        pending=view.pending,
        expired_unprocessed=view.expired_unprocessed,
        total=view.total,
        next_pending_release=view.next_pending_release,
        expiring_soon=[
            ExpiringRead(date=e.date, expires_at=e.expires_at, points=e.points)
            for e in view.expiring_soon
        ],
        qualifying_points=qualifying_points(session, member_id=member.id),
        tier=tier_progress(session, member_id=member.id),
    )


def person_export(session: Session, warehouse: Warehouse, profile_id: str) -> list[dict[str, Any]]:
    """Everything loyalty holds about a profile, for identity's export (JSON-ready): each
    programme's membership with the memberships merged into it, its balance, every ledger
    entry, redemption (coupon codes included) and tier change, oldest first."""
    del warehouse  # part of identity's section contract; loyalty's data is all here
    now = utcnow()
    heads = session.scalars(
        select(Member).where(Member.profile_id == profile_id).order_by(Member.enrolled_at)
    ).all()
    out: list[dict[str, Any]] = []
    for head in heads:
        group = member_group(session, member_id=head.id)
        program = get_program(session, program_id=head.program_id)
        entries = session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.member_id.in_(group))
            .order_by(LedgerEntry.occurred_at, LedgerEntry.id)
        ).all()
        redemptions = session.scalars(
            select(Redemption)
            .where(Redemption.member_id.in_(group))
            .order_by(Redemption.created_at, Redemption.id)
        ).all()
        changes = session.scalars(
            select(TierChange)
            .where(TierChange.member_id.in_(group))
            .order_by(TierChange.at, TierChange.id)
        ).all()
        merged = [m for m in session.scalars(select(Member).where(Member.id.in_(group[1:])))]
        out.append(
            {
                "program": {"id": program.id, "name": program.name},
                "membership": MemberRead.model_validate(head).model_dump(mode="json"),
                "merged_memberships": [
                    MemberRead.model_validate(m).model_dump(mode="json") for m in merged
                ],
                "balance": balance_read(session, member_id=head.id).model_dump(mode="json"),
                "ledger": [LedgerEntryRead.at(e, now).model_dump(mode="json") for e in entries],
                "redemptions": [
                    RedemptionRead.model_validate(r).model_dump(mode="json") for r in redemptions
                ],
                "tier_history": [
                    TierChangeRead.model_validate(c).model_dump(mode="json") for c in changes
                ],
            }
        )
    return out


def member_group(session: Session, *, member_id: str) -> list[str]:
    """The member and every membership merged into it (their history is its history)."""
    merged = session.scalars(select(Member.id).where(Member.merged_into == member_id)).all()
    return [member_id, *merged]


def history(
    session: Session, *, member_id: str, kind: str | None = None, limit: int, offset: int
) -> tuple[list[LedgerEntry], int]:
    """A member's ledger entries (and those of memberships merged into it), newest first by
    when they happened (`occurred_at`: a backfill writes years of history at once, so the
    write time says nothing), then by write time and id."""
    get_member(session, member_id=member_id)
    query = select(LedgerEntry).where(
        LedgerEntry.member_id.in_(member_group(session, member_id=member_id))
    )
    if kind is not None:
        query = query.where(LedgerEntry.kind == kind)
    return paginate(
        session,
        query,
        LedgerEntry.occurred_at.desc(),
        LedgerEntry.created_at.desc(),
        LedgerEntry.id.desc(),
        limit=limit,
        offset=offset,
    )


def qualifying_points(session: Session, *, member_id: str, since: datetime | None = None) -> int:
    """Qualifying points of a member (and merged memberships), optionally since an instant."""
    query = select(func.coalesce(func.sum(LedgerEntry.qualifying_points), 0)).where(
        LedgerEntry.member_id.in_(member_group(session, member_id=member_id))
    )
    if since is not None:
        query = query.where(LedgerEntry.occurred_at >= since)
    return int(session.scalar(query) or 0)


def merge_profiles(
    session: Session,
    *,
    program_id: str,
    from_profile_id: str,
    to_profile_id: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> tuple[Member | None, Member | None, int]:
    """Fold the membership of a merged-away profile into the survivor's.

    Both members: the absorbed member's lots move to the survivor (with a pair of `merge`
    entries so each member's entries still sum to its lots), it becomes `merged`, and its
    history counts for the survivor's tier. Only the absorbed profile is a member: its
    membership is re-keyed to the survivor. Replaying a merge changes nothing.
    """
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    source = find_member(session, program_id=program_id, profile_id=from_profile_id)
    target = find_member(session, program_id=program_id, profile_id=to_profile_id)
    if source is None or from_profile_id == to_profile_id:
        # A profile merged into itself: nothing to fold (the membership would end up merged
        # into itself and vanish).
        return source, target, 0
    if source.status == "merged":
        return source, target, 0
    if target is None:
        source.profile_id = to_profile_id
        session.add(
            MemberMerge(
                program_id=program_id,
                kind="rekey",
                from_member_id=source.id,
                to_member_id=source.id,
                points=0,
                at=now,
                reason=reason or f"profile {from_profile_id} merged into {to_profile_id}",
            )
        )
        session.flush()
        return source, source, 0
    for member_id in sorted((source.id, target.id)):
        ledger.lock_member(session, member_id=member_id)
    moved = _move_lots(
        session,
        program=program,
        from_member=source,
        to_member=target,
        lot_filter=None,
        kind="merge",
        key=f"merge:{source.id}:{target.id}:{now.isoformat()}",
        now=now,
    )
    session.execute(
        update(Member).where(Member.merged_into == source.id).values(merged_into=target.id)
    )
    source.status = "merged"
    source.merged_into = target.id
    source.status_changed_at = now
    statuses.record(session, member=source, status="merged", at=now, reason="merge")
    if source.enrolled_at < target.enrolled_at:
        target.enrolled_at = source.enrolled_at
    session.add(
        MemberMerge(
            program_id=program_id,
            kind="merge",
            from_member_id=source.id,
            to_member_id=target.id,
            points=moved,
            at=now,
            reason=reason,
        )
    )
    session.flush()
    tiers.evaluate(session, program=program, member_ids=[target.id], now=now)
    return source, target, moved


EventProfiles = dict[int, str] | Callable[[list[int]], dict[int, str]]


def event_profiles_of(warehouse: Warehouse, *, event_ids: list[int]) -> dict[int, str]:
    """The profile identity gives each of these events now (absent: erased or unresolved)."""
    if not event_ids:
        return {}
    frame = warehouse.run(
        queries.event_profiles_of(
            sorted(set(event_ids)), event_profiles=identity_service.event_profile_sql()
        )
    )
    return dict(zip(frame["event_id"].to_list(), frame["profile_id"].to_list(), strict=True))


def _group_head(session: Session, member: Member) -> Member:
    if member.status == "merged" and member.merged_into is not None:
        return get_member(session, member_id=member.merged_into)
    return member


def split_profiles(
    session: Session,
    *,
    program_id: str,
    from_profile_id: str,
    to_profile_id: str,
    event_profiles: EventProfiles | None = None,
    reason: str | None = None,
    now: datetime | None = None,
    key: str | None = None,
) -> tuple[Member | None, Member | None, int]:
    """Apply an identity split: part of `from_profile_id` now forms `to_profile_id`.

    This is identity's direction (`merges_since` rows of kind 'split'). Each ledger entry of
    the membership of `from_profile_id` (and of the memberships merged into it) follows the
    event that earned it: when `event_profiles` (event id → profile now, a dict or a lookup
    function) puts the event in `to_profile_id`, the entry's lot (what is left of it) and its
    qualifying points move to the membership of `to_profile_id`, created if needed (enrolled
    at its first moved entry), with a pair of `split` entries naming the moved entry
    (`source_entry_id`, at the moved entry's time, so tier windows stay right). Entries
    without an event (adjustments, bonuses, imports) and events missing from the map follow
    the member that earned them. When the membership of `to_profile_id` was merged into that
    of `from_profile_id` (an undone merge), it is restored first and takes back what it
    earned. Purchase activity follows its event too. Replaying a split changes nothing.
    """
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    key = key or f"split:{from_profile_id}:{to_profile_id}:{now.isoformat()}"
    found = find_member(session, program_id=program_id, profile_id=from_profile_id)
    target = find_member(session, program_id=program_id, profile_id=to_profile_id)
    if found is None or found.status == "erased":
        return found, target, 0
    head = _group_head(session, found)
    restoring = target is not None and target.merged_into == head.id
    if target is not None and target.id == head.id:
        return head, target, 0
    group = set(member_group(session, member_id=head.id))
    candidates = _split_candidates(session, program_id=program.id, group=group)
    activity = session.execute(
        select(Activity.id, Activity.member_id, Activity.event_id).where(
            Activity.program_id == program.id, Activity.member_id.in_(list(group))
        )
    ).all()
    if event_profiles is None:
        owners: dict[int, str] = {}
    elif callable(event_profiles):
        ids = [c["event_id"] for c in candidates if c["event_id"] is not None]
        ids += [a.event_id for a in activity if a.event_id is not None]
        owners = event_profiles(ids) if ids else {}
    else:
        owners = event_profiles
    restored_id = target.id if (target is not None and restoring) else None

    def goes_to_target(row: dict[str, Any]) -> bool:  # Any: column values
        owner = owners.get(row["event_id"]) if row["event_id"] is not None else None
        if owner is not None:
            return owner == to_profile_id
        return bool(row["earner"] == restored_id)

    moving = [c for c in candidates if goes_to_target(c)]
    if not moving and not restoring:
        return head, target, 0
    for member_id in sorted({head.id} | ({target.id} if target is not None else set())):
        ledger.lock_member(session, member_id=member_id)
    if target is None:
        target = Member(
            program_id=program.id,
            profile_id=to_profile_id,
            status="active",
            enrolled_at=min(c["occurred_at"] for c in moving),
            status_changed_at=now,
        )
        session.add(target)
        session.flush()
        statuses.record(
            session, member=target, status="active", at=target.enrolled_at, reason="split"
        )
        session.flush()
    elif restoring:
        target.status = "active"
        target.merged_into = None
        target.status_changed_at = now
        statuses.record(session, member=target, status="active", at=now, reason="split")
        session.flush()
    group_of = {m: head.id for m in group - {target.id}} | {target.id: target.id}
    rows: list[dict[str, Any]] = []  # Any: column values
    moved_lots: dict[str, list[str]] = {target.id: [], head.id: []}
    moved_points = 0
    for row in candidates:
        dest = target.id if goes_to_target(row) else head.id
        source_group = group_of.get(row["q_holder"])
        qualifying = row["qualifying"] if source_group not in (None, dest) else 0
        points = 0
        if row["lot_holder"] is not None and row["lot_holder"] != dest:
            points = int(row["remaining"] or 0)
            moved_lots[dest].append(row["id"])
        if not points and not qualifying:
            continue
        moved_points += points
        origin = row["lot_holder"] if points else source_group
        q_origin = source_group if qualifying else origin
        assert origin is not None
        assert q_origin is not None
        pair = (
            [(origin, -points, -qualifying, "out"), (dest, points, qualifying, "in")]
            if origin == q_origin
            else [
                (origin, -points, 0, "out"),
                (q_origin, 0, -qualifying, "q-out"),
                (dest, points, qualifying, "in"),
            ]
        )
        for member_id, pts, qual, suffix in pair:
            entry_key = f"{key}:{row['id']}:{suffix}"
            rows.append(
                {
                    "id": ledger.entry_id(entry_key),
                    "program_id": program.id,
                    "member_id": member_id,
                    "kind": "split",
                    "points": pts,
                    "qualifying_points": qual,
                    "unrecovered": 0,
                    "status": "active",
                    "occurred_at": row["occurred_at"],
                    "local_date": row["local_date"],
                    "created_at": now,
                    "order_id": row["order_id"],
                    "source_entry_id": row["id"],
                    "reason": f"split of {from_profile_id}: follows event {row['event_id']}",
                    "idempotency_key": entry_key,
                }
            )
    if rows:
        session.execute(ledger.insert_ignoring_conflicts(session, LedgerEntry.__table__), rows)
    for dest_id, lot_ids in moved_lots.items():
        for chunk in ledger.in_chunks(lot_ids):
            session.execute(update(Lot).where(Lot.entry_id.in_(chunk)).values(member_id=dest_id))
    # Purchase activity (spend and orders tier metrics) follows its event the same way.
    for activity_id, member_id, event_id in activity:
        dest = target.id if goes_to_target({"event_id": event_id, "earner": member_id}) else head.id
        if group_of.get(member_id) != dest:
            session.execute(
                update(Activity).where(Activity.id == activity_id).values(member_id=dest)
            )
    session.add(
        MemberMerge(
            program_id=program_id,
            kind="split",
            from_member_id=head.id,
            to_member_id=target.id,
            points=moved_points,
            at=now,
            reason=reason,
        )
    )
    session.flush()
    tiers.evaluate(session, program=program, member_ids=[target.id], now=now)
    return head, target, moved_points


def _split_candidates(
    session: Session, *, program_id: str, group: set[str]
) -> list[dict[str, Any]]:  # Any: column values
    """Every entry whose lot or qualifying points a member of the group holds now.

    The holder of an entry's qualifying points is its earner, or the member the last `split`
    transfer of it went to; split transfers themselves are never candidates.
    """
    last_in = (
        select(
            LedgerEntry.source_entry_id.label("entry_id"),
            func.max(LedgerEntry.created_at).label("at"),
        )
        .where(
            LedgerEntry.program_id == program_id,
            LedgerEntry.kind == "split",
            LedgerEntry.qualifying_points != 0,
            LedgerEntry.idempotency_key.like("%:in"),
        )
        .group_by(LedgerEntry.source_entry_id)
        .subquery()
    )
    transfer = (
        select(LedgerEntry.source_entry_id, LedgerEntry.member_id)
        .join(
            last_in,
            (last_in.c.entry_id == LedgerEntry.source_entry_id)
            & (last_in.c.at == LedgerEntry.created_at),
        )
        .where(LedgerEntry.kind == "split", LedgerEntry.idempotency_key.like("%:in"))
        .subquery()
    )
    members = list(group)
    result = session.execute(
        select(
            LedgerEntry.id,
            LedgerEntry.member_id,
            LedgerEntry.event_id,
            LedgerEntry.qualifying_points,
            LedgerEntry.occurred_at,
            LedgerEntry.local_date,
            LedgerEntry.order_id,
            Lot.member_id,
            Lot.remaining,
            transfer.c.member_id,
        )
        .outerjoin(Lot, Lot.entry_id == LedgerEntry.id)
        .outerjoin(transfer, transfer.c.source_entry_id == LedgerEntry.id)
        .where(
            LedgerEntry.program_id == program_id,
            LedgerEntry.kind != "split",
            LedgerEntry.kind != "merge",
            (
                LedgerEntry.member_id.in_(members)
                | Lot.member_id.in_(members)
                | transfer.c.member_id.in_(members)
            ),
        )
        .order_by(LedgerEntry.occurred_at, LedgerEntry.id)
    ).all()
    rows = []
    for entry, earner, event_id, qual, at, day, order, lot_holder, remaining, moved_to in result:
        q_holder = moved_to or earner
        rows.append(
            {
                "id": entry,
                "earner": earner,
                "event_id": event_id,
                "qualifying": int(qual or 0) if q_holder in group else 0,
                "q_holder": q_holder,
                "occurred_at": at,
                "local_date": day,
                "order_id": order,
                "lot_holder": lot_holder if lot_holder in group else None,
                "remaining": remaining,
            }
        )
    return rows


def _move_lots(
    session: Session,
    *,
    program: Program,
    from_member: Member,
    to_member: Member,
    lot_filter: list[str] | None,
    kind: str,
    key: str,
    now: datetime,
) -> int:
    condition: list[Any] = [Lot.member_id == from_member.id]  # Any: SQL expressions
    if lot_filter is not None:
        if not lot_filter:
            return 0
        condition.append(Lot.entry_id.in_(lot_filter))
    moved = int(
        session.scalar(select(func.coalesce(func.sum(Lot.remaining), 0)).where(*condition)) or 0
    )
    session.execute(update(Lot).where(*condition).values(member_id=to_member.id))
    local = calendar.local_date(now, program.timezone)
    for member, points, suffix in ((from_member, -moved, "out"), (to_member, moved, "in")):
        session.add(
            LedgerEntry(
                id=ledger.entry_id(f"{key}:{suffix}"),
                program_id=program.id,
                member_id=member.id,
                kind=kind,
                points=points,
                qualifying_points=0,
                unrecovered=0,
                status="active",
                occurred_at=now,
                local_date=local,
                created_at=now,
                reason=f"{kind} {from_member.id} → {to_member.id}",
                idempotency_key=f"{key}:{suffix}",
            )
        )
    session.flush()
    return moved


def apply_merges(
    session: Session, *, pairs: list[tuple[str, str, str]], now: datetime | None = None
) -> int:
    """Apply identity's merges and splits `(kind, from_profile, to_profile)` to every programme."""
    program_ids = session.scalars(select(Program.id)).all()
    moved = 0
    for kind, source, target in pairs:
        for program_id in program_ids:
            if kind == "merge":
                moved += merge_profiles(
                    session,
                    program_id=program_id,
                    from_profile_id=source,
                    to_profile_id=target,
                    now=now,
                )[2]
            else:
                moved += split_profiles(
                    session,
                    program_id=program_id,
                    from_profile_id=source,
                    to_profile_id=target,
                    now=now,
                )[2]
    return moved


def sync_merges(
    session: Session,
    warehouse: Warehouse,
    *,
    program_id: str,
    now: datetime | None = None,
    touched: set[str] | None = None,
) -> tuple[int, int]:
    """Apply identity's merges and splits published since the programme's merge mark.

    Returns (merges and splits applied, points moved); the profiles on both sides of each
    are added to `touched` if given. Replaying is harmless: a merge or a split already
    applied changes nothing, so the mark only saves work.
    """
    program = get_program(session, program_id=program_id)
    published = identity_service.merges_since(warehouse, after_seq=program.last_merge_seq)
    if touched is not None:
        touched.update(published["from_profile_id"].cast(pl.String))
        touched.update(published["to_profile_id"].cast(pl.String))
    moved = 0
    for row in published.iter_rows(named=True):
        if row["kind"] == "merge":
            moved += merge_profiles(
                session,
                program_id=program.id,
                from_profile_id=str(row["from_profile_id"]),
                to_profile_id=str(row["to_profile_id"]),
                reason=row["reason"],
                now=now,
            )[2]
            continue
        moved += split_profiles(
            session,
            program_id=program.id,
            from_profile_id=str(row["from_profile_id"]),
            to_profile_id=str(row["to_profile_id"]),
            event_profiles=lambda ids: event_profiles_of(warehouse, event_ids=ids),
            reason=row["reason"],
            now=now,
            key=f"identity-split:{row['seq']}",
        )[2]
    if published.height:
        program.last_merge_seq = int(published["seq"].max())  # type: ignore[arg-type]
    session.flush()
    return published.height, moved


def anonymise_profile(
    session: Session, *, program_id: str, profile_id: str, now: datetime | None = None
) -> int:
    """Anonymise the membership of an erased profile (and the memberships merged into it).

    The ledger's sums stay (points outstanding are still a liability, and every member's
    entries still sum to its lots); what links them to the person goes: the membership's
    profile id becomes `erased:<member id>` and its status `erased`; its entries, lots and
    activity lose their event, message and order ids and free-text reasons, and their
    idempotency keys (built from message ids) become `erased:<id>`; merge records lose their
    reasons (identity's name identifiers); stored API responses that name the profile (or
    a merged one) are deleted. Returns the number of memberships anonymised; a second call
    finds nothing.
    """
    now = now or utcnow()
    head = find_member(session, program_id=program_id, profile_id=profile_id)
    if head is None:
        return 0
    members = session.scalars(
        select(Member).where(
            Member.program_id == program_id,
            (Member.id == head.id) | (Member.merged_into == head.id),
        )
    ).all()
    ids = [m.id for m in members]
    profile_ids = sorted({m.profile_id for m in members} | {profile_id})
    for member in members:
        member.profile_id = f"erased:{member.id}"
        if member.status != "merged":
            member.status = "erased"
            statuses.record(session, member=member, status="erased", at=now, reason="erasure")
        member.status_changed_at = now
    erased_key = literal("erased:") + LedgerEntry.id
    session.execute(
        update(LedgerEntry)
        .where(LedgerEntry.member_id.in_(ids))
        .values(
            event_id=None,
            message_id=None,
            order_id=None,
            reason=None,
            idempotency_key=erased_key,
        )
    )
    session.execute(update(Lot).where(Lot.member_id.in_(ids)).values(order_id=None))
    session.execute(
        update(Activity)
        .where(Activity.member_id.in_(ids))
        .values(event_id=None, order_id=None, idempotency_key=literal("erased:") + Activity.id)
    )
    session.execute(
        update(MemberMerge)
        .where(MemberMerge.from_member_id.in_(ids) | MemberMerge.to_member_id.in_(ids))
        .values(reason=None)
    )
    for named in profile_ids:
        session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.response.contains(named, autoescape=True)
            )
        )
    session.flush()
    logger.info("loyalty membership anonymised", extra={"member_id": head.id})
    return len(ids)


def sync_erasures(
    session: Session,
    warehouse: Warehouse,
    *,
    program_id: str,
    touched: set[str] | None = None,
) -> int:
    """Anonymise the memberships of the profiles identity erased since the programme's mark.

    Returns how many erasures were read, and adds their profiles to `touched` if given;
    replaying is harmless (the profile id is gone).
    """
    program = get_program(session, program_id=program_id)
    published = identity_service.erasures_since(warehouse, after_seq=program.last_erasure_seq)
    if touched is not None:
        touched.update(published["profile_id"].cast(pl.String))
    for row in published.iter_rows(named=True):
        anonymise_profile(session, program_id=program.id, profile_id=str(row["profile_id"]))
    if published.height:
        program.last_erasure_seq = int(published["seq"].max())  # type: ignore[arg-type]
    session.flush()
    return published.height


_SNAPSHOT_SCHEMA = {
    "program_id": pl.String(),
    "program_created_at": pl.Datetime("us"),
    "profile_id": pl.String(),
    "member_id": pl.String(),
    "status": pl.String(),
    "enrolled": pl.Boolean(),
    "enrolled_at": pl.Datetime("us"),
    "tier": pl.String(),
    "balance": pl.Int64(),
    "refreshed_at": pl.Datetime("us"),
}


# One publish at a time: a full rewrite and a partial one replace the same rows (DuckDB would
# refuse one of the two transactions), and a partial one committed while a full one is
# between its reads and its write would be overwritten by older figures.
_SNAPSHOT_LOCK = threading.Lock()


class SnapshotBusy(Exception):
    """Another publish of the member snapshot is running (and the caller would not wait)."""


def publish_member_snapshot(
    session: Session,
    warehouse: Warehouse,
    *,
    now: datetime | None = None,
    members: Collection[str] | None = None,
    profiles: Collection[str] | None = None,
    wait: bool = True,
) -> int:
    """Write the warehouse member snapshot (the segment fields) from the operational store.

    One row per membership not merged away, with its tier name and spendable balance
    (lots neither pending nor expired at `now`). With neither `members` nor `profiles`,
    every row is rewritten (the scheduled job: it also catches what time alone changes,
    pending points becoming spendable and expiries). Otherwise only the rows of these
    memberships and of every membership of these profiles are replaced, or removed when
    merged away or erased (the real-time job: at 1M members the whole rewrite takes
    seconds). Returns the number of rows written. `wait` false: SnapshotBusy at once if
    another publish is running (the caller keeps its rows for later).
    """
    if not _SNAPSHOT_LOCK.acquire(blocking=wait):
        raise SnapshotBusy("another publish of the member snapshot is running")
    try:
        now = now or utcnow()
        whole = members is None and profiles is None
        ids: set[str] | None = None
        if not whole:
            ids = set(members or ())
            if profiles:
                ids.update(_members_of_profiles(session, profiles=profiles))
        frame = _snapshot_rows(session, now=now, members=ids)
        if whole:
            _replace_snapshot_rows(warehouse, frame, queries.DELETE_SNAPSHOT, {})
        else:
            _replace_snapshot_rows(
                warehouse,
                frame,
                queries.DELETE_SNAPSHOT_ROWS,
                {"members": sorted(ids or ()), "profiles": sorted(profiles or ())},
            )
        return frame.height
    finally:
        _SNAPSHOT_LOCK.release()


def _replace_snapshot_rows(
    warehouse: Warehouse,
    frame: pl.DataFrame,
    delete: str,
    params: dict[str, Any],  # Any: the delete statement's parameters
) -> None:
    """Delete the snapshot rows `delete` names and insert `frame`, in one transaction."""
    with warehouse.transaction() as cur:
        cur.execute(delete, params or None)
        cur.register("snapshot_frame", frame)
        cur.execute(queries.INSERT_SNAPSHOT)
        cur.unregister("snapshot_frame")


def publish_member_snapshot_slice(
    session: Session, warehouse: Warehouse, *, after: str, limit: int, now: datetime | None = None
) -> tuple[int, str | None]:
    """Rewrite the snapshot rows of the next `limit` memberships by id after `after` ("" for
    the first): (rows written, the last id of the slice, or None once the slice reached the
    last membership, whose range is then open-ended).

    The scheduled job publishes the snapshot a slice at a time, so that every row is
    rewritten within a few minutes without the whole rewrite's burst: at 1M members that
    took 37 s under load and held real time back seconds each time. Rows of the slice's id
    range that no membership holds any more (merged away, erased) are removed with it.
    """
    # The slice's last id: the `limit`-th after `after`, if there are that many.
    through = session.scalar(
        select(Member.id).where(Member.id > after).order_by(Member.id).offset(limit - 1).limit(1)
    )
    with _SNAPSHOT_LOCK:
        frame = _snapshot_rows(session, now=now or utcnow(), id_range=(after, through))
        _replace_snapshot_rows(
            warehouse, frame, queries.DELETE_SNAPSHOT_RANGE, {"after": after, "through": through}
        )
    return frame.height, through


def _members_of_profiles(session: Session, *, profiles: Collection[str]) -> set[str]:
    """The ids of every membership, in any programme, of these profiles."""
    programs = list(session.scalars(select(Program.id)))
    return {
        str(member)
        for chunk in ledger.in_chunks(sorted(profiles))
        for member in session.scalars(
            select(Member.id).where(Member.program_id.in_(programs), Member.profile_id.in_(chunk))
        )
    }


def _snapshot_rows(
    session: Session,
    *,
    now: datetime,
    members: Collection[str] | None = None,
    id_range: tuple[str, str | None] | None = None,
) -> pl.DataFrame:
    """The snapshot rows of every membership not merged away or erased, or of those among
    `members`, or of those whose id is after `id_range[0]` and up to `id_range[1]` (no
    upper bound if None)."""
    spendable = (
        Lot.remaining > 0,
        (Lot.expires_at.is_(None)) | (Lot.expires_at > now),
        (Lot.pending_until.is_(None)) | (Lot.pending_until <= now),
    )
    selected = [
        Member.program_id,
        Program.created_at,
        Member.profile_id,
        Member.id,
        Member.status,
        Member.enrolled_at,
        Tier.name,
    ]
    live = Member.status.not_in(["merged", "erased"])
    utc = pl.Datetime("us", "UTC")
    balance_schema: dict[str, pl.DataType] = {"member_id": pl.String(), "balance": pl.Int64()}
    member_schema: dict[str, pl.DataType] = {
        "program_id": pl.String(),
        "program_created_at": utc,
        "profile_id": pl.String(),
        "member_id": pl.String(),
        "status": pl.String(),
        "enrolled_at": utc,
        "tier": pl.String(),
    }

    def balances_of(owner: Any, *where: Any) -> Any:  # Any: a column, conditions, a Select
        return select(owner, func.sum(Lot.remaining)).where(*where, *spendable).group_by(owner)

    def members_of(*where: Any) -> Any:  # Any: conditions, a Select
        return (
            select(*selected)
            .join(Program, Program.id == Member.program_id)
            .outerjoin(Tier, Tier.id == Member.tier_id)
            .where(*where, live)
        )

    if id_range is not None:
        # A slice: the members by their primary key, their lots through the member index.
        after, through = id_range
        in_range = [Member.id > after] + ([Member.id <= through] if through else [])
        lots_in_range = [Lot.member_id > after] + ([Lot.member_id <= through] if through else [])
        balances = frame_of(session, balances_of(Lot.member_id, *lots_in_range), balance_schema)
        frame = frame_of(session, members_of(*in_range), member_schema)
    elif members is None:
        # Two reads joined here. The balances grouped by an expression, in one scan and a
        # sort: by the member index SQLite fetched each lot at a random place (19.3 s for
        # 8.5M lots, 3.9 s this way); and joined to the members in Polars: SQLite scanned
        # the grouped balances once per member when asked to join them. Each read is
        # converted a partition at a time (`frame_of`): the job runs in the server, beside
        # real time.
        balances = frame_of(session, balances_of(ledger.unindexed(Lot.member_id)), balance_schema)
        frame = frame_of(session, members_of(), member_schema)
    else:
        # A few members (a real-time pass's): each one's lots and row through their
        # indexes, each read's rows in one step (`all_rows`).
        balance_rows: list[Any] = []  # Any: rows
        member_rows: list[Any] = []  # Any: rows
        for chunk in ledger.in_chunks(sorted(members)):
            balance_rows += all_rows(session, balances_of(Lot.member_id, Lot.member_id.in_(chunk)))
            member_rows += all_rows(session, members_of(Member.id.in_(chunk)))
        balances = pl.DataFrame(balance_rows, schema=balance_schema, orient="row")
        frame = pl.DataFrame(member_rows, schema=member_schema, orient="row")
    return frame.join(balances, on="member_id", how="left").select(
        "program_id",
        pl.col("program_created_at").dt.replace_time_zone(None),
        "profile_id",
        "member_id",
        "status",
        (pl.col("status") == "active").alias("enrolled"),
        pl.col("enrolled_at").dt.replace_time_zone(None),
        "tier",
        pl.col("balance").fill_null(0),
        pl.lit(now.replace(tzinfo=None), dtype=pl.Datetime("us")).alias("refreshed_at"),
    )


def member_by_identifier(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    program_id: str,
    kind: str,
    value: str,
) -> Member:
    """The membership of the profile holding an identifier (normalised as identity does)."""
    profile_id = identity_service.lookup_identifier(
        warehouse, settings=settings, kind=kind, value=value
    )
    if profile_id is None:
        raise MemberNotFound(f"no profile holds {kind} {value!r}")
    return member_by_profile(session, program_id=program_id, profile_id=profile_id)


def create_reward(session: Session, *, program_id: str, data: RewardCreate) -> Reward:
    """Add a reward to a programme's catalogue."""
    get_program(session, program_id=program_id)
    if data.min_tier_id is not None:
        tier = session.get(Tier, data.min_tier_id)
        if tier is None or tier.program_id != program_id:
            raise TierNotFound(f"tier {data.min_tier_id} is not a tier of this programme")
    reward = Reward(
        program_id=program_id, status="active", created_at=utcnow(), **data.model_dump()
    )
    session.add(reward)
    session.flush()
    return reward


def get_reward(session: Session, *, reward_id: str) -> Reward:
    """The reward with this id, or RewardNotFound."""
    reward = session.get(Reward, reward_id)
    if reward is None:
        raise RewardNotFound(f"reward {reward_id} does not exist")
    return reward


def list_rewards(
    session: Session, *, program_id: str, limit: int, offset: int
) -> tuple[list[Reward], int]:
    """A programme's catalogue, cheapest first."""
    query = select(Reward).where(Reward.program_id == program_id)
    return paginate(session, query, Reward.points_cost, Reward.id, limit=limit, offset=offset)


def set_reward_status(session: Session, *, reward_id: str, status: str) -> Reward:
    """Archive or re-activate a reward."""
    reward = get_reward(session, reward_id=reward_id)
    reward.status = status
    session.flush()
    return reward


def _tier_rank(session: Session, tier_id: str | None) -> int:
    if tier_id is None:
        return 0
    tier = session.get(Tier, tier_id)
    return tier.rank if tier is not None else 0


def _new_coupon_code() -> str:
    token = secrets.token_hex(8).upper()
    return f"LOY-{token[:4]}-{token[4:8]}-{token[8:12]}-{token[12:]}"


def redeem(
    session: Session,
    *,
    member_id: str,
    reward_id: str,
    now: datetime | None = None,
) -> Redemption:
    """Redeem a reward: balance, tier, stock, limit and validity checked, then the ledger
    entry, the stock decrement and a unique coupon code written in this one transaction.

    The member's lock (`ledger.lock_member`) serialises the redemptions of one member; the
    reward's row lock (PostgreSQL) and the conditional stock decrement serialise its stock.
    """
    now = now or utcnow()
    program, member = require_active_member(session, member_id=member_id)
    ledger.lock_member(session, member_id=member.id)
    query = select(Reward).where(Reward.id == reward_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    reward = session.scalar(query.execution_options(populate_existing=True))
    if reward is None or reward.program_id != program.id:
        raise RewardNotFound(f"reward {reward_id} is not in this programme's catalogue")
    if reward.status != "active":
        raise RewardNotAvailable(f"reward {reward.id} is {reward.status}")
    if (reward.valid_from and now < reward.valid_from) or (
        reward.valid_until and now >= reward.valid_until
    ):
        raise RewardNotAvailable(f"reward {reward.id} is outside its validity window")
    if _tier_rank(session, member.tier_id) < _tier_rank(session, reward.min_tier_id):
        raise RewardNotAvailable(f"reward {reward.id} needs a higher tier")
    if reward.per_member_limit is not None:
        used = session.scalar(
            select(func.count())
            .select_from(Redemption)
            .where(
                Redemption.member_id.in_(member_group(session, member_id=member.id)),
                Redemption.reward_id == reward.id,
                Redemption.status == "issued",
            )
        )
        if (used or 0) >= reward.per_member_limit:
            raise RedemptionLimitReached(
                f"reward {reward.id} can be redeemed {reward.per_member_limit} times per member"
            )
    if reward.stock is not None and reward.stock <= 0:
        raise OutOfStock(f"reward {reward.id} is out of stock")
    redemption_id = new_id()
    entry = ledger.debit(
        session,
        program=program,
        member_id=member.id,
        kind="redeem",
        points=reward.points_cost,
        idempotency_key=f"redeem:{redemption_id}",
        now=now,
        redemption_id=redemption_id,
        reason=f"reward {reward.name}",
    )
    if reward.stock is not None:
        taken = session.execute(
            update(Reward)
            .where(Reward.id == reward.id, Reward.stock > 0)
            .values(stock=Reward.stock - 1)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            raise OutOfStock(f"reward {reward.id} is out of stock")
    redemption = Redemption(
        id=redemption_id,
        program_id=program.id,
        member_id=member.id,
        reward_id=reward.id,
        points=reward.points_cost,
        coupon_code=_new_coupon_code(),
        status="issued",
        entry_id=entry.id,
        created_at=now,
    )
    session.add(redemption)
    session.flush()
    logger.info(
        "reward redeemed",
        extra={"member_id": member.id, "reward_id": reward.id, "redemption_id": redemption_id},
    )
    return redemption


def get_redemption(session: Session, *, redemption_id: str) -> Redemption:
    """The redemption with this id, or RedemptionNotFound."""
    redemption = session.get(Redemption, redemption_id)
    if redemption is None:
        raise RedemptionNotFound(f"redemption {redemption_id} does not exist")
    return redemption


def list_redemptions(
    session: Session, *, member_id: str, limit: int, offset: int
) -> tuple[list[Redemption], int]:
    """A member's redemptions, newest first."""
    query = select(Redemption).where(Redemption.member_id == member_id)
    return paginate(
        session, query, Redemption.created_at.desc(), Redemption.id, limit=limit, offset=offset
    )


def cancel_redemption(
    session: Session,
    *,
    redemption_id: str,
    reason: str,
    actor: str | None = None,
    now: datetime | None = None,
) -> Redemption:
    """Cancel a redemption: its points go back to the lots they came from, stock comes back."""
    now = now or utcnow()
    redemption = get_redemption(session, redemption_id=redemption_id)
    # The lots drawn on may have moved to a survivor (merge) or another member (split) since.
    holders = ledger.draw_owners(session, entry_id=redemption.entry_id)
    ledger.lock_members(session, member_ids=[redemption.member_id, *holders])
    session.refresh(redemption)
    if redemption.status == "cancelled":
        raise RedemptionAlreadyCancelled(f"redemption {redemption.id} was cancelled already")
    program = get_program(session, program_id=redemption.program_id)
    original = session.get(LedgerEntry, redemption.entry_id)
    assert original is not None
    member = get_member(session, member_id=redemption.member_id)
    entry = ledger.give_back(
        session,
        program=program,
        original=original,
        member_id=_group_head(session, member).id,
        kind="refund",
        idempotency_key=f"cancel:{redemption.id}",
        now=now,
        reason=reason,
        actor=actor,
    )
    session.execute(
        update(Reward)
        .where(Reward.id == redemption.reward_id, Reward.stock.is_not(None))
        .values(stock=Reward.stock + 1)
    )
    redemption.status = "cancelled"
    redemption.cancelled_at = now
    redemption.cancel_entry_id = entry.id
    session.flush()
    return redemption


def _check_segments(session: Session, condition: dict[str, Any] | None) -> None:  # Any: JSON
    """InvalidRule when a condition names a saved segment that does not exist."""
    for segment_id in sorted(rules.segment_ids(rules.parse_condition(condition))):
        if segments_service.find_segment(session, segment_id=segment_id) is None:
            raise InvalidRule(
                f"invalid condition: no saved segment {segment_id!r}"
                " (a segment condition names a saved segment by its id)"
            )


def create_rule(session: Session, *, program_id: str, data: RuleCreate) -> Rule:
    """Add an earning rule to a programme."""
    get_program(session, program_id=program_id)
    _check_segments(session, data.condition)
    rule = Rule(program_id=program_id, created_at=utcnow(), **data.model_dump())
    session.add(rule)
    session.flush()
    return rule


def get_rule(session: Session, *, rule_id: str) -> Rule:
    """The rule with this id, or RuleNotFound."""
    rule = session.get(Rule, rule_id)
    if rule is None:
        raise RuleNotFound(f"rule {rule_id} does not exist")
    return rule


def list_rules(
    session: Session, *, program_id: str, limit: int, offset: int
) -> tuple[list[Rule], int]:
    """A programme's rules in stacking order."""
    query = select(Rule).where(Rule.program_id == program_id)
    return paginate(session, query, Rule.priority, Rule.id, limit=limit, offset=offset)


def update_rule(session: Session, *, rule_id: str, data: RuleUpdate) -> Rule:
    """Change a rule; only the fields given change (past awards stay as they are)."""
    rule = get_rule(session, rule_id=rule_id)
    if "condition" in data.model_fields_set:
        _check_segments(session, data.condition)
    for name, value in data.model_dump(exclude_unset=True).items():
        if value is None and name in {"name", "formula", "priority", "status"}:
            continue
        setattr(rule, name, value)
    session.flush()
    return rule


def _json_text(value: Any) -> str:  # Any: a JSON value
    """A JSON value as the text a condition reads (strings unquoted, like properties)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _sample_profile(
    warehouse: Warehouse | None,
    *,
    member: Member | None,
    sample: SampleMember,
    needs: rules.ProfileNeeds,
) -> dict[str, Any]:  # Any: column values of the sample row
    """The profile columns of a dry run's member: an existing member's stored traits,
    attributes and segment memberships (read from the warehouse when given), with what the
    request gives in their place (traits when not empty, attributes by name, segments when
    given); a described member has only what the request gives."""
    stored: dict[str, Any] = {}  # Any: column values
    if member is not None and warehouse is not None and needs:
        stored = profile_data(warehouse, needs=needs, profile_ids=[member.profile_id]).row(
            0, named=True
        )
    values: dict[str, Any] = {  # Any: column values
        "traits": orjson.dumps(sample.traits).decode()
        if sample.traits or stored.get("traits") is None
        else stored["traits"]
    }
    for name in needs.attributes:
        values[f"attributes.{name}"] = stored.get(f"attributes.{name}")
    for name, value in sample.attributes.items():
        values[f"attributes.{name}"] = None if value is None else _json_text(value)
    for segment_id in needs.segments:
        column = rules.segment_column(segment_id)
        if sample.segments is not None:
            values[column] = segment_id in sample.segments
        else:
            values[column] = bool(stored.get(column))
    return values


def _sample_frame(
    session: Session,
    warehouse: Warehouse | None,
    *,
    program: Program,
    request: DryRunRequest,
    now: datetime,
    needs: rules.ProfileNeeds,
) -> tuple[pl.DataFrame, str | None]:
    sample = request.member
    member = None
    if sample.member_id is not None:
        member = get_member(session, member_id=sample.member_id)
        if member.program_id != program.id:
            raise MemberNotFound(f"member {member.id} is not in programme {program.id}")
    profile = _sample_profile(warehouse, member=member, sample=sample, needs=needs)
    tier_id = member.tier_id if member is not None else None
    tier = session.get(Tier, tier_id) if tier_id is not None else None
    if member is None and sample.tier is not None:
        tier = session.scalar(
            select(Tier).where(Tier.program_id == program.id, Tier.name == sample.tier)
        )
        if tier is None:
            raise TierNotFound(f"programme {program.id} has no tier named {sample.tier!r}")
    at = as_utc(request.event.timestamp or now)
    enrolled = member.enrolled_at if member is not None else sample.enrolled_at or at
    frame = pl.DataFrame(
        [
            {
                "event_id": 0,
                "message_id": request.event.message_id,
                "source_id": request.event.source_id,
                "type": request.event.type,
                "event": request.event.event,
                "timestamp": at,
                "properties": orjson.dumps(request.event.properties).decode(),
                "profile_id": member.profile_id if member is not None else "dry-run",
                "member_id": member.id if member is not None else "dry-run",
                "member_status": member.status if member is not None else "active",
                "enrolled_at": as_utc(enrolled),
                "tier_name": tier.name if tier is not None else None,
                "tier_rank": tier.rank if tier is not None else None,
                "tier_multiplier": tier.multiplier if tier is not None else None,
                **profile,
            }
        ],
        schema_overrides={
            "timestamp": pl.Datetime("us", "UTC"),
            "enrolled_at": pl.Datetime("us", "UTC"),
            "tier_name": pl.String(),
            "tier_rank": pl.Int64(),
            "tier_multiplier": pl.Float64(),
            **{c: pl.Boolean() if c.startswith("segment:") else pl.String() for c in profile},
        },
    ).with_columns(
        ((pl.col("timestamp") - pl.col("enrolled_at")).dt.total_days()).alias("seniority_days")
    )
    if member is None:
        return frame, None
    # An existing member is judged with its status at the sample event's time, as earning
    # does: a sample dated while it was away is "not active".
    return statuses.at_events(session, program_id=program.id, frame=frame), member.id


def dry_run(
    session: Session,
    *,
    program_id: str,
    request: DryRunRequest,
    warehouse: Warehouse | None = None,
    now: datetime | None = None,
) -> DryRunResult:
    """Evaluate rules against a sample event and member, explaining each rule's verdict.

    Nothing is written. With an existing member, its tier, seniority and the caps it has
    used are those of the ledger, and (with `warehouse`) its profile's traits, computed
    attributes and segment memberships are the stored ones unless the request gives them.
    """
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    if request.rules is None:
        specs = engine.active_rules(session, program_id=program.id)
    else:
        specs = [
            engine.RuleSpec.of(Rule(id=f"draft-{i}", program_id=program.id, **r.model_dump()))
            for i, r in enumerate(request.rules)
        ]
        for draft in request.rules:
            _check_segments(session, draft.condition)
    frame, member_id = _sample_frame(
        session,
        warehouse,
        program=program,
        request=request,
        now=now,
        needs=engine.profile_needs(specs),
    )
    prepared = engine.prepare(frame, program.timezone)
    priors = engine.Priors()
    if member_id is not None and specs:
        priors = engine.load_priors(
            session,
            specs=specs,
            members=[member_id],
            since=prepared["local_date"][0],
        )
    traced = engine.trace(prepared, specs, priors)
    awards = engine.apply_caps(traced, specs, priors)
    awarded = dict(zip(awards["rule_id"].to_list(), awards["points"].to_list(), strict=True))
    by_rule = {row["rule_id"]: row for row in traced.iter_rows(named=True)}
    verdicts = []
    for spec in sorted(specs, key=lambda s: (s.priority, s.id)):
        row = by_rule.get(spec.id)
        points = int(awarded.get(spec.id, 0))
        if row is None:
            verdicts.append(
                RuleVerdict(
                    rule_id=spec.id,
                    name=spec.name,
                    fired=False,
                    reason=f"triggers on {spec.event_name!r}, not {request.event.event!r}",
                    trigger_matched=False,
                    in_window=None,
                    condition=None,
                    blocked_by=None,
                    base=None,
                    multiplier=None,
                    raw_points=0,
                    points=0,
                )
            )
            continue
        raw = int(row["raw_points"])
        if not row["in_window"]:
            reason = "outside the rule's campaign window"
        elif not row["condition"]:
            reason = "condition is false"
        elif row["blocked_by"] is not None:
            reason = f"an exclusive rule fired first ({row['blocked_by']})"
        elif not row["fired"]:
            reason = "member is not active"
        elif raw <= 0:
            reason = "the formula gives 0 points"
        elif points == 0:
            reason = "capped: member limit, daily or monthly cap, or budget reached"
        elif points < raw:
            reason = f"fired, capped from {raw} to {points} points"
        else:
            reason = f"fired: {points} points"
        verdicts.append(
            RuleVerdict(
                rule_id=spec.id,
                name=spec.name,
                fired=points > 0,
                reason=reason,
                trigger_matched=True,
                in_window=bool(row["in_window"]),
                condition=rules.explain_condition(spec.condition, prepared),
                blocked_by=row["blocked_by"],
                base=float(row["base"]),
                multiplier=float(row["multiplier"]),
                raw_points=raw,
                points=points,
            )
        )
    return DryRunResult(total_points=sum(v.points for v in verdicts), rules=verdicts)


def read_events(
    warehouse: Warehouse,
    *,
    after_event_id: int,
    up_to_event_id: int,
    names: list[str],
    specs: list[engine.RuleSpec] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pl.DataFrame:
    """Warehouse events of the given names in `(after, up_to]`, with their profile ids.

    With `specs`, the properties the rules read (and `order_id`) come parsed by the
    warehouse as `properties.<path>` columns (and `properties.products` for per-line rules).
    """
    paths, products = engine.warehouse_fields(specs or [])
    events = warehouse.run(
        queries.events_between(
            after_event_id=after_event_id,
            up_to_event_id=up_to_event_id,
            names=names,
            paths=paths,
            products=products,
            since=None if since is None else since.astimezone(UTC).replace(tzinfo=None),
            until=None if until is None else until.astimezone(UTC).replace(tzinfo=None),
            # Identity resolves only the events read (a slice of a backfill needs its own
            # events' identifiers, not the whole history's).
            event_profiles=identity_service.scoped_event_profile_sql(),
        )
    )
    if paths:
        events = events.rename({f"f{i}": f"properties.{p}" for i, p in enumerate(paths)})
    if products:
        events = events.rename({"products": "properties.products"})
    if events.is_empty():
        return pl.DataFrame(schema=engine.EVENT_SCHEMA)
    return events.with_columns(pl.col("profile_id").cast(pl.String))


def process_range(
    session: Session,
    warehouse: Warehouse,
    *,
    program_id: str,
    after_event_id: int,
    up_to_event_id: int,
    batch_size: int = 250_000,
    now: datetime | None = None,
    by_time: bool = False,
) -> engine.ProcessResult:
    """Process warehouse events in `(after, up_to]` in batches of event ids, or (`by_time`,
    from the first event) in slices of event time of about `batch_size` events each."""
    program = get_program(session, program_id=program_id)
    specs = engine.active_rules(session, program_id=program.id)
    # Birthday bonuses come from the scheduled job only, never from tracked events.
    names = sorted(
        ({s.event_name for s in specs} | {engine.ORDER_EVENT, engine.REFUND_EVENT})
        - {engine.BIRTHDAY_EVENT}
    )
    loader = profile_loader(warehouse, specs=specs)
    total = engine.ProcessResult()
    touched: set[str] = set()
    if by_time:
        # Slices of event time, so events loaded out of time order (a file imported after
        # the web stream) are processed in time order: the first purchase is the earliest.
        count = int(
            warehouse.scalar(queries.count_events(up_to_event_id=up_to_event_id, names=names)) or 0
        )
        batches = max(1, -(-count // batch_size))
        cuts: list[datetime | None] = []
        if batches > 1:
            frame = warehouse.run(
                queries.time_boundaries(up_to_event_id=up_to_event_id, names=names, batches=batches)
            )
            cuts = [as_utc(c) for c in frame["cut"].to_list()]
        edges = [None, *cuts, None]
        slices = [(0, up_to_event_id, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    else:
        slices = [
            (start, min(start + batch_size, up_to_event_id), None, None)
            for start in range(after_event_id, up_to_event_id, batch_size)
        ]
    for start, end, since, until in slices:
        started = time.perf_counter()
        events = read_events(
            warehouse,
            after_event_id=start,
            up_to_event_id=end,
            names=names,
            specs=specs,
            since=since,
            until=until,
        )
        logger.debug("read %d events in %.2f s", events.height, time.perf_counter() - started)
        result = engine.process_events(
            session, program=program, events=events, profile_data=loader, now=now
        )
        total.events += result.events
        total.enrolled += result.enrolled
        total.credits += result.credits
        total.points += result.points
        total.reversals += result.reversals
        touched.update(result.members)
    total.members = sorted(touched)
    return total


def profile_data(
    warehouse: Warehouse, *, needs: rules.ProfileNeeds, profile_ids: list[str]
) -> pl.DataFrame:
    """What `needs` names of these profiles, read set-based (a few statements per batch,
    whatever its size): one row per profile id with `traits` (JSON text, from identity's
    `profiles`), `attributes.<name>` (text: numbers as numbers, timestamps as ISO
    `YYYY-MM-DDTHH:MM:SS`, from the last attribute refresh) and `segment:<id>` (whether the
    profile is a member as of the segment's last refresh)."""
    frame = pl.DataFrame({"profile_id": profile_ids}, schema={"profile_id": pl.String()})
    if needs.traits:
        traits = warehouse.run(queries.profile_traits(profile_ids))
        frame = frame.join(
            traits.select(pl.col("profile_id").cast(pl.String), pl.col("traits").cast(pl.String)),
            on="profile_id",
            how="left",
        )
    if needs.attributes:
        values = segments_service.attribute_values(
            warehouse, profile_ids=profile_ids, names=sorted(needs.attributes)
        )
        texts = [
            (
                pl.col(c).dt.strftime("%Y-%m-%dT%H:%M:%S")
                if values.schema[c].is_temporal()
                else pl.col(c).cast(pl.String)
            ).alias(f"attributes.{c}")
            for c in values.columns
            if c != "profile_id"
        ]
        if texts:
            frame = frame.join(
                values.select(pl.col("profile_id").cast(pl.String), *texts),
                on="profile_id",
                how="left",
            )
    if needs.segments:
        members = segments_service.memberships_among(
            warehouse, segment_ids=sorted(needs.segments), profile_ids=profile_ids
        )
        frame = frame.with_columns(
            pl.col("profile_id")
            .is_in(
                members.filter(pl.col("segment_id") == s)["profile_id"].cast(pl.String).implode()
            )
            .alias(rules.segment_column(s))
            for s in sorted(needs.segments)
        )
    return frame


def profile_loader(
    warehouse: Warehouse, *, specs: list[engine.RuleSpec]
) -> engine.ProfileLoader | None:
    """The engine's reader of the profile data these rules' conditions need, or None when
    they need none (then nothing is read)."""
    needs = engine.profile_needs(specs)
    if not needs:
        return None
    return lambda profile_ids: profile_data(warehouse, needs=needs, profile_ids=profile_ids)


def _resolved_up_to(warehouse: Warehouse) -> int:
    """The last event both loaded and resolved into a profile by identity."""
    loaded = int(warehouse.scalar(queries.max_event_id()) or 0)
    return min(loaded, identity_service.resolved_up_to(warehouse))


def sync_program(
    session: Session,
    warehouse: Warehouse,
    *,
    program_id: str,
    now: datetime | None = None,
    max_events: int | None = None,
) -> tuple[engine.ProcessResult, int]:
    """Process the events loaded since the programme's high-water mark, then advance it.

    `max_events` caps the range of event ids taken, so a long history can be processed in
    several short transactions (call again until the mark stops moving).
    """
    program = get_program(session, program_id=program_id)
    if program.status != "active":
        raise ProgramNotActive(f"programme {program.id} is {program.status}")
    up_to = _resolved_up_to(warehouse)
    if max_events is not None:
        up_to = min(up_to, program.last_event_id + max_events)
    result = process_range(
        session,
        warehouse,
        program_id=program.id,
        after_event_id=program.last_event_id,
        up_to_event_id=up_to,
        now=now,
    )
    program.last_event_id = max(program.last_event_id, up_to)
    session.flush()
    return result, program.last_event_id


def backfill(
    session: Session, warehouse: Warehouse, *, program_id: str, now: datetime | None = None
) -> tuple[engine.ProcessResult, int]:
    """Process the whole event history set-based (retroactive points), then move the mark.

    The history is taken in slices of event time, so it earns as if processed one event
    at a time in time order, whatever order its sources were loaded in.

    Idempotent: events already processed (by real time or an earlier backfill) add nothing.
    """
    program = get_program(session, program_id=program_id)
    up_to = _resolved_up_to(warehouse)
    deferred = _deferrable(session, program, events=up_to)
    with ledger.large_cache(session), ledger.deferred_indexes(session, names=deferred):
        result = process_range(
            session,
            warehouse,
            program_id=program.id,
            after_event_id=0,
            up_to_event_id=up_to,
            now=now,
            by_time=True,
        )
    program.last_event_id = max(program.last_event_id, up_to)
    session.flush()
    return result, program.last_event_id


def _deferrable(session: Session, program: Program, *, events: int) -> list[str]:
    """The secondary indexes a backfill of about `events` events builds after its writes
    instead of during them: only when it will write about as much as the ledger holds (the
    launch case, or a history larger than the ledger), since building an index reads the
    whole table, every programme's entries included."""
    if session.get_bind().dialect.name != "sqlite":
        return []  # see `ledger.deferred_indexes`
    if events <= ledger.entry_rows_estimate(session):
        return []
    names = list(ledger.DEFERRABLE_INDEXES)
    if not tiers.ladder(session, program_id=program.id):
        names += ledger.MEMBER_INDEXES
    return names


def birthday_codes(day: date) -> list[int]:
    """The `month * 100 + day` birthdays celebrated on a date: 29 February is celebrated
    on 1 March in common years (as the segment rule `birthday_in_next_days` counts it)."""
    codes = [day.month * 100 + day.day]
    leap = day.year % 4 == 0 and (day.year % 100 != 0 or day.year % 400 == 0)
    if (day.month, day.day) == (3, 1) and not leap:
        codes.append(229)
    return codes


def award_birthdays(
    session: Session, warehouse: Warehouse, *, program_id: str, now: datetime | None = None
) -> engine.ProcessResult:
    """Give the birthday bonus to active members whose birthday is today in the programme's
    time zone (the profile trait `birth_date`, an ISO date).

    The bonus is whatever the programme's active rules triggered on `Birthday` award
    (conditions, tier multiplier and caps apply as for any event). Each member gets one
    `Birthday` event per local year, at the local midnight starting the day, whose message id
    `birthday:<member>:<year>` puts its entries under the keys
    `event:birthday:<member>:<year>:rule:<rule>`: running the job again the same day, or on
    another day of the same year, awards nothing twice.
    """
    program = get_program(session, program_id=program_id)
    result = engine.ProcessResult()
    specs = [
        s
        for s in engine.active_rules(session, program_id=program.id)
        if s.event_name == engine.BIRTHDAY_EVENT
    ]
    if program.status != "active" or not specs:
        return result
    now = now or utcnow()
    today = calendar.local_date(now, program.timezone)
    profiles = warehouse.run(queries.birthday_profiles(birthday_codes(today)))
    if profiles.is_empty():
        return result
    members = engine.member_frame(
        session, program_id=program.id, profiles=profiles["profile_id"].to_list()
    ).filter(pl.col("member_status") == "active")
    if members.is_empty():
        return result
    midnight = calendar.start_of_day(today, program.timezone)
    events = members.select(
        pl.lit(None, dtype=pl.Int64).alias("event_id"),
        pl.concat_str(pl.lit("birthday:"), pl.col("member_id"), pl.lit(f":{today.year}")).alias(
            "message_id"
        ),
        pl.lit("loyalty").alias("source_id"),
        pl.lit("track").alias("type"),
        pl.lit(engine.BIRTHDAY_EVENT).alias("event"),
        pl.lit(midnight).dt.convert_time_zone("UTC").alias("timestamp"),
        pl.lit("{}").alias("properties"),
        "profile_id",
    )
    return engine.process_events(
        session,
        program=program,
        events=events,
        profile_data=profile_loader(warehouse, specs=specs),
        now=now,
    )


def create_tier(session: Session, *, program_id: str, data: TierCreate) -> Tier:
    """Add a tier to the programme's ladder (ranks are unique, 1 the lowest)."""
    get_program(session, program_id=program_id)
    clash = session.scalar(
        select(Tier.id).where(Tier.program_id == program_id, Tier.rank == data.rank)
    )
    if clash is not None:
        raise InvalidProgram(f"the programme has a tier of rank {data.rank} already")
    tier = Tier(program_id=program_id, **data.model_dump())
    session.add(tier)
    session.flush()
    return tier


def list_tiers(session: Session, *, program_id: str) -> list[Tier]:
    """The programme's ladder, lowest first."""
    get_program(session, program_id=program_id)
    return tiers.ladder(session, program_id=program_id)


def tier_progress(
    session: Session, *, member_id: str, now: datetime | None = None
) -> TierProgress | None:
    """A member's tier, metric in the window, and what the next tier needs (None: no tiers)."""
    now = now or utcnow()
    member = get_member(session, member_id=member_id)
    program = get_program(session, program_id=member.program_id)
    ladder = tiers.ladder(session, program_id=program.id)
    if not ladder:
        return None
    value = tiers.metrics(session, program=program, member_ids=[member.id], now=now)[member.id]
    current = next((t for t in ladder if t.id == member.tier_id), None)
    rank = current.rank if current is not None else 0
    upper = next((t for t in ladder if t.rank > rank), None)
    return TierProgress(
        tier_id=current.id if current else None,
        tier_name=current.name if current else None,
        metric=program.tier_metric,
        window_start=tiers.window_start(program, now),
        value=value,
        next_tier_id=upper.id if upper else None,
        next_tier_name=upper.name if upper else None,
        next_threshold=upper.threshold if upper else None,
        missing=max(0.0, upper.threshold - value) if upper else None,
    )


def upgrade_tiers(
    session: Session, *, program_id: str, member_ids: list[str], now: datetime | None = None
) -> list[tiers.Move]:
    """Upgrade the given members who reached a higher tier (after earning)."""
    program = get_program(session, program_id=program_id)
    return tiers.evaluate(session, program=program, member_ids=member_ids, now=now or utcnow())


def reevaluate_tiers(
    session: Session, *, program_id: str, now: datetime | None = None
) -> list[tiers.Move]:
    """The periodic re-evaluation: upgrades, and downgrades past the grace period."""
    program = get_program(session, program_id=program_id)
    return tiers.reevaluate(session, program=program, now=now or utcnow())


def tier_history(session: Session, *, member_id: str) -> list[TierChange]:
    """A member's tier movements, oldest first."""
    get_member(session, member_id=member_id)
    return list(
        session.scalars(
            select(TierChange)
            .where(TierChange.member_id == member_id)
            .order_by(TierChange.at, TierChange.id)
        )
    )


def tier_changes(
    session: Session,
    *,
    program_id: str,
    since: datetime,
    after_id: str | None = None,
    limit: int,
    offset: int,
) -> tuple[list[TierChange], int]:
    """Tier movements of a programme recorded since an instant (published for activation), in
    (`recorded_at`, id) order; an instant without a zone is UTC, as everywhere in the API.

    By when they were recorded, not when they took effect (`at`): a late event or a backfill
    records upgrades dated in the past, which a feed by `at` hid behind an instant its
    consumer had already read. `since` is inclusive; with `after_id`, the feed starts after
    the change (`since`, `after_id`), so a consumer that keeps the last change's
    `recorded_at` and id reads each change once.
    """
    get_program(session, program_id=program_id)
    since = as_utc(since)
    after = (
        TierChange.recorded_at >= since
        if after_id is None
        else (TierChange.recorded_at > since)
        | ((TierChange.recorded_at == since) & (TierChange.id > after_id))
    )
    query = select(TierChange).where(TierChange.program_id == program_id, after)
    return paginate(
        session, query, TierChange.recorded_at, TierChange.id, limit=limit, offset=offset
    )


def expire_points(session: Session, *, program_id: str, now: datetime | None = None) -> int:
    """Write the expiry entries of every lot past its expiry; returns how many."""
    program = get_program(session, program_id=program_id)
    return ledger.expire_due(session, program=program, now=now)


def due_lots(session: Session, *, program_id: str, now: datetime) -> list[str]:
    """The ids of the lots past their expiry at `now` that still hold points (for
    `expire_lots`, in transactions of their own)."""
    return ledger.due_lots(session, program=get_program(session, program_id=program_id), now=now)


def expire_lots(session: Session, *, program_id: str, lot_ids: list[str], now: datetime) -> int:
    """Expire these lots (from `due_lots`, possibly listed in an earlier transaction); how
    many expiry entries were written."""
    program = get_program(session, program_id=program_id)
    return ledger.expire_lots(session, program=program, lot_ids=lot_ids, now=now)


def expiring_soon(
    session: Session, *, program_id: str, days: int = 30, now: datetime | None = None
) -> list[tuple[str, str, int, datetime]]:
    """Members with points expiring within `days`: (member, profile, points, first expiry),
    soonest first. Every one of them (`expiring_page` for one page)."""
    query = _expiring(session, program_id=program_id, days=days, now=now)
    return [(str(m), str(p), int(n), e) for m, p, n, e in session.execute(query).all()]


def expiring_page(
    session: Session,
    *,
    program_id: str,
    days: int = 30,
    limit: int,
    offset: int,
    now: datetime | None = None,
) -> tuple[list[tuple[str, str, int, datetime]], int]:
    """One page of `expiring_soon` and how many members there are in all (a large programme
    has hundreds of thousands to remind: 286,175 at 1M members)."""
    query = _expiring(session, program_id=program_id, days=days, now=now)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.limit(limit).offset(offset)).all()
    return [(str(m), str(p), int(n), e) for m, p, n, e in rows], total


def _expiring(
    session: Session, *, program_id: str, days: int, now: datetime | None
) -> Select[Any]:  # Any: member, profile, points, first expiry
    now = now or utcnow()
    get_program(session, program_id=program_id)
    # The lots expiring soon grouped first, in one scan (by the member index SQLite fetched
    # every lot of every member at a random place: 18 s at 1M members), then their members.
    owner = ledger.unindexed(Lot.member_id)
    expiring = (
        select(
            owner.label("member_id"),
            func.sum(Lot.remaining).label("points"),
            func.min(Lot.expires_at).label("first"),
        )
        .where(
            Lot.program_id == program_id,
            Lot.remaining > 0,
            Lot.expires_at > now,
            Lot.expires_at <= now + timedelta(days=days),
        )
        .group_by(owner)
        .subquery()
    )
    return (
        select(expiring.c.member_id, Member.profile_id, expiring.c.points, expiring.c.first)
        .join(Member, Member.id == expiring.c.member_id)
        # Reminders go to members who can still spend: not to opted-out, unenrolled or erased
        # ones (their points still expire, see `expire_points`).
        .where(Member.status == "active")
        .order_by(expiring.c.first, expiring.c.member_id)
    )


# Who a row is for: our profile id, or an identifier the old system knew the member by.
IMPORT_KEYS = (("profile_id",), ("identifier_kind", "identifier"))
IMPORT_OPTIONAL = ("expires_at", "tier", "enrolled_at", *(c for key in IMPORT_KEYS for c in key))


def import_opening_balances(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    program_id: str,
    content: bytes,
    now: datetime | None = None,
) -> ImportResult:
    """Import opening balances from a CSV file (migrating from another system).

    Columns: `balance`, who the row is for, and optionally `expires_at` (ISO 8601), `tier`
    (a tier name) and `enrolled_at` (ISO 8601). Who: `profile_id` (a merged-away id counts
    for its survivor), or `identifier_kind` and `identifier` (e.g. `loyalty_card`, `email`:
    normalised and looked up as identity does); a row with a `profile_id` uses it. Each
    profile gets at most one opening balance, keyed `import:<programme>:<profile>`, so
    importing the same file again changes nothing. Bad rows (unknown profile, identifier no
    profile holds, bad number or date, unknown tier, a profile named twice) are reported by
    their row number (1 = first data row); good rows are imported.
    """
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    try:
        raw = pl.read_csv(content, infer_schema=False)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise InvalidImport(f"cannot read the file as CSV: {exc}") from None
    if "balance" not in raw.columns:
        raise InvalidImport("missing column: balance")
    if not any(all(c in raw.columns for c in key) for key in IMPORT_KEYS):
        raise InvalidImport("missing columns: profile_id, or identifier_kind and identifier")
    for optional in IMPORT_OPTIONAL:
        if optional not in raw.columns:
            raw = raw.with_columns(pl.lit(None, dtype=pl.String).alias(optional))
    ladder = {t.name: t for t in tiers.ladder(session, program_id=program.id)}
    parsed = raw.with_row_index("row", offset=1).with_columns(
        *(_blank_as_null(c) for c in ("profile_id", "identifier_kind", "identifier")),
        pl.col("balance").str.strip_chars().cast(pl.Int64, strict=False).alias("points"),
        pl.col("expires_at")
        .str.strip_chars()
        .str.to_datetime(time_zone="UTC", strict=False)
        .alias("expires_override"),
        pl.col("enrolled_at")
        .str.strip_chars()
        .str.to_datetime(time_zone="UTC", strict=False)
        .alias("enrolled"),
    )
    parsed = parsed.with_columns(
        pl.Series("profile", _import_profiles(warehouse, settings, parsed), dtype=pl.String)
    )
    by_identifier = pl.col("profile_id").is_null() & pl.col("identifier").is_not_null()
    problem = (
        pl.when(pl.col("profile_id").is_null() & pl.col("identifier").is_null())
        .then(pl.lit("profile_id (or identifier) is empty"))
        .when(by_identifier & pl.col("identifier_kind").is_null())
        .then(pl.lit("identifier_kind is empty"))
        .when(pl.col("profile_id").is_not_null() & pl.col("profile").is_null())
        .then(pl.format("no profile {}", pl.col("profile_id")))
        .when(by_identifier & pl.col("profile").is_null())
        .then(pl.format("no profile holds {} {}", pl.col("identifier_kind"), pl.col("identifier")))
        .when(pl.col("points").is_null() | (pl.col("points") < 0))
        .then(pl.lit("balance is not a whole number >= 0"))
        .when(pl.col("expires_at").is_not_null() & pl.col("expires_override").is_null())
        .then(pl.lit("expires_at is not an ISO 8601 date-time"))
        .when(pl.col("enrolled_at").is_not_null() & pl.col("enrolled").is_null())
        .then(pl.lit("enrolled_at is not an ISO 8601 date-time"))
        .when(pl.col("tier").is_not_null() & ~pl.col("tier").is_in(list(ladder)))
        .then(pl.lit("unknown tier"))
        .otherwise(None)
    )
    checked = parsed.with_columns(problem.alias("problem"))
    # A profile named by several rows (two ids merged since, an id and an identifier of
    # the same person): none of them is imported, since which one the old system meant
    # is not for the import to guess.
    checked = checked.with_columns(
        pl.when(
            pl.col("problem").is_null()
            & pl.col("profile").is_duplicated()
            & pl.col("profile").is_not_null()
        )
        .then(pl.lit("the same profile is named by another row"))
        .otherwise(pl.col("problem"))
        .alias("problem")
    )
    errors = [
        ImportRowError(row=int(r["row"]), message=str(r["problem"]))
        for r in checked.filter(pl.col("problem").is_not_null()).iter_rows(named=True)
    ]
    good = (
        checked.filter(pl.col("problem").is_null())
        .drop("profile_id")
        .rename({"profile": "profile_id"})
    )
    members_created = 0
    if not good.is_empty():
        result = session.execute(
            ledger.insert_ignoring_conflicts(session, Member.__table__).returning(
                Member.__table__.c.id
            ),
            [
                {
                    "id": new_id(),
                    "program_id": program.id,
                    "profile_id": r["profile_id"],
                    "status": "active",
                    "enrolled_at": r["enrolled"] or now,
                    "status_changed_at": now,
                    "lock_seq": 0,
                }
                for r in good.iter_rows(named=True)
            ],
        )
        created = [row[0] for row in result.all()]
        members_created = len(created)
    else:
        created = []
    found = engine.member_frame(
        session, program_id=program.id, profiles=good["profile_id"].to_list()
    )
    statuses.record_many(
        session,
        program_id=program.id,
        members=found.filter(pl.col("member_id").is_in(created)).select(
            "member_id", pl.col("enrolled_at").alias("at")
        ),
        status="active",
        reason="import",
    )
    ids = found.select("profile_id", "member_id")
    credits = (
        good.join(ids, on="profile_id")
        .filter(pl.col("points") > 0)
        .select(
            "member_id",
            pl.lit("import").alias("kind"),
            "points",
            pl.lit(0).alias("qualifying_points"),
            pl.lit(now).dt.convert_time_zone("UTC").alias("occurred_at"),
            pl.concat_str(pl.lit(f"import:{program.id}:"), pl.col("profile_id")).alias(
                "idempotency_key"
            ),
            "expires_override",
            pl.lit(True).alias("no_pending"),
            pl.lit("opening balance").alias("reason"),
        )
    )
    imported = ledger.write_credits(session, program=program, frame=credits, now=now)
    tiers_set = 0
    for r in (
        good.join(ids, on="profile_id").filter(pl.col("tier").is_not_null()).iter_rows(named=True)
    ):
        already = session.scalar(
            select(TierChange.id).where(
                TierChange.member_id == r["member_id"], TierChange.reason == tiers.IMPORT_REASON
            )
        )
        if already is not None:
            continue
        member = get_member(session, member_id=r["member_id"])
        tier = ladder[r["tier"]]
        tiers.record_change(
            session,
            TierChange(
                program_id=program.id,
                member_id=member.id,
                from_tier_id=member.tier_id,
                to_tier_id=tier.id,
                reason=tiers.IMPORT_REASON,
                metric_value=0.0,
                at=now,
            ),
        )
        member.tier_id = tier.id
        member.tier_since = now
        tiers_set += 1
    session.flush()
    return ImportResult(
        rows=raw.height,
        imported=imported,
        already_imported=credits.height - imported,
        members_created=members_created,
        tiers_set=tiers_set,
        errors=errors,
    )


def _blank_as_null(column: str) -> pl.Expr:
    text = pl.col(column).str.strip_chars()
    return pl.when(text != "").then(text).alias(column)


def _import_profiles(
    warehouse: Warehouse, settings: Settings, rows: pl.DataFrame
) -> list[str | None]:
    """The live profile of each import row: its `profile_id` followed through merges, else
    the profile holding its identifier; None when there is none (reported by the caller)."""
    by_id = rows.filter(pl.col("profile_id").is_not_null())
    by_identifier = rows.filter(
        pl.col("profile_id").is_null()
        & pl.col("identifier").is_not_null()
        & pl.col("identifier_kind").is_not_null()
    )
    found: dict[int, str | None] = {}
    found.update(
        zip(
            by_id["row"].to_list(),
            identity_service.live_profile_ids(warehouse, profile_ids=by_id["profile_id"].to_list()),
            strict=True,
        )
    )
    found.update(
        zip(
            by_identifier["row"].to_list(),
            identity_service.lookup_identifiers(
                warehouse,
                settings=settings,
                kinds=by_identifier["identifier_kind"].to_list(),
                values=by_identifier["identifier"].to_list(),
            ),
            strict=True,
        )
    )
    return [found.get(row) for row in rows["row"].to_list()]


# Any: a dialect-aware "first day of the period" SQL construct, given by the caller
# (dashboards passes its `day_start` / `week_start` / `month_start`).
PeriodOf = Callable[[Any], Any]

# Which ledger entries make each points flow, and the sign that makes the flow positive.
POINTS_FLOWS: dict[str, tuple[tuple[str, ...], int]] = {
    "issued": (("earn", "import", "bonus", "adjust"), 1),
    "redeemed": (("redeem", "refund"), -1),
    "expired": (("expire",), -1),
}


def points_flow_select(
    *,
    flow: str,
    start: datetime,
    end_excl: datetime,
    period: PeriodOf,
    program_id: str | None,
    by_program: bool,
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: points of a flow (`issued`, `redeemed`, `expired`) per period.

    Issued counts earned, imported and bonus points and positive manual adjustments;
    redeemed is redemptions net of cancelled ones; expired is expiry entries. Entries are
    dated by `occurred_at` (UTC).
    """
    kinds, sign = POINTS_FLOWS[flow]
    when = period(LedgerEntry.occurred_at).label("period")
    key = (LedgerEntry.program_id if by_program else cast(null(), String)).label("key")
    query = (
        select(when, key, (sign * func.sum(LedgerEntry.points)).label("value"))
        .where(
            LedgerEntry.kind.in_(kinds),
            LedgerEntry.occurred_at >= start,
            LedgerEntry.occurred_at < end_excl,
        )
        .group_by(when, key)
        .order_by(when, key)
    )
    if flow == "issued":
        query = query.where((LedgerEntry.kind != "adjust") | (LedgerEntry.points > 0))
    if program_id is not None:
        query = query.where(LedgerEntry.program_id == program_id)
    return query


def enrolments_select(
    *,
    start: datetime,
    end_excl: datetime,
    period: PeriodOf,
    program_id: str | None,
    by_program: bool,
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: memberships by enrolment day (merged-away ones not counted)."""
    when = period(Member.enrolled_at).label("period")
    key = (Member.program_id if by_program else cast(null(), String)).label("key")
    query = (
        select(when, key, func.count().label("value"))
        .where(
            Member.status != "merged",
            Member.enrolled_at >= start,
            Member.enrolled_at < end_excl,
        )
        .group_by(when, key)
        .order_by(when, key)
    )
    if program_id is not None:
        query = query.where(Member.program_id == program_id)
    return query


def active_members_select(
    *,
    start: datetime,
    end_excl: datetime,
    period: PeriodOf,
    program_id: str | None,
    by_program: bool,
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: distinct members who earned or redeemed in each period.

    A merged-away membership's entries stay its own: they count for its survivor, so a
    person whose two memberships both earned in a period counts once.
    """
    when = period(LedgerEntry.occurred_at).label("period")
    key = (LedgerEntry.program_id if by_program else cast(null(), String)).label("key")
    person = func.coalesce(Member.merged_into, Member.id)
    query = (
        select(when, key, func.count(func.distinct(person)).label("value"))
        .join(Member, Member.id == LedgerEntry.member_id)
        .where(
            LedgerEntry.kind.in_(["earn", "redeem"]),
            LedgerEntry.occurred_at >= start,
            LedgerEntry.occurred_at < end_excl,
        )
        .group_by(when, key)
        .order_by(when, key)
    )
    if program_id is not None:
        query = query.where(LedgerEntry.program_id == program_id)
    return query


def redemption_rate_select(
    *,
    start: datetime,
    end_excl: datetime,
    period: PeriodOf,
    program_id: str | None,
    by_program: bool,
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: points redeemed / points issued in each period (see POINTS_FLOWS)."""
    issued_kinds, _ = POINTS_FLOWS["issued"]
    redeemed_kinds, _ = POINTS_FLOWS["redeemed"]
    points = LedgerEntry.points
    issued = func.sum(
        case(
            (
                LedgerEntry.kind.in_(issued_kinds)
                & ((LedgerEntry.kind != "adjust") | (points > 0)),
                points,
            ),
            else_=0,
        )
    )
    redeemed = -func.sum(case((LedgerEntry.kind.in_(redeemed_kinds), points), else_=0))
    when = period(LedgerEntry.occurred_at).label("period")
    key = (LedgerEntry.program_id if by_program else cast(null(), String)).label("key")
    query = (
        select(when, key, (cast(redeemed, Float) / func.nullif(issued, 0)).label("value"))
        .where(LedgerEntry.occurred_at >= start, LedgerEntry.occurred_at < end_excl)
        .group_by(when, key)
        .having(issued != 0)
        .order_by(when, key)
    )
    if program_id is not None:
        query = query.where(LedgerEntry.program_id == program_id)
    return query


def members_now_select(
    *, period_value: date | None, program_id: str | None, breakdown: str | None
) -> Select[date, str, int]:
    """`period, key, value`: memberships not merged away now, on the period `period_value`.

    A level known only now (None: the range does not include today, nothing is answered).
    Breakdown `program` or `status`.
    """
    keys = {"program": Member.program_id, "status": Member.status}
    key = (keys[breakdown] if breakdown else cast(null(), String)).label("key")
    at = literal(period_value, Date()).label("period")
    query = (
        select(at, key, func.count().label("value"))
        .where(Member.status != "merged")
        .group_by(key)
        .order_by(key)
    )
    if period_value is None:
        query = query.where(false())
    if program_id is not None:
        query = query.where(Member.program_id == program_id)
    return query


def liability_now_select(
    *, period_value: date | None, now: datetime, program_id: str | None, by_program: bool
) -> Select[date, str, int]:
    """`period, key, value`: unexpired points left (pending too) times the point value."""
    key = (Lot.program_id if by_program else cast(null(), String)).label("key")
    at = literal(period_value, Date()).label("period")
    query = (
        select(at, key, func.sum(Lot.remaining * Program.point_value).label("value"))
        .join(Program, Program.id == Lot.program_id)
        .where(Lot.remaining > 0, (Lot.expires_at.is_(None)) | (Lot.expires_at > now))
        .group_by(key)
        .order_by(key)
    )
    if period_value is None:
        query = query.where(false())
    if program_id is not None:
        query = query.where(Lot.program_id == program_id)
    return query


def tier_distribution_select(
    *, period_value: date | None, program_id: str | None, by_tier: bool
) -> Select[date, str, int]:
    """`period, key, value`: active members now by tier name (`none` without a tier)."""
    name = func.coalesce(Tier.name, "none")
    key = (name if by_tier else cast(null(), String)).label("key")
    at = literal(period_value, Date()).label("period")
    query = (
        select(at, key, func.count().label("value"))
        .select_from(Member)
        .outerjoin(Tier, Tier.id == Member.tier_id)
        .where(Member.status == "active")
        .group_by(key)
        .order_by(key)
    )
    if period_value is None:
        query = query.where(false())
    if program_id is not None:
        query = query.where(Member.program_id == program_id)
    return query


def _enrolment_by_month(session: Session, *, program: Program) -> dict[str, int]:
    """Memberships not merged away by local month of enrolment (`YYYY-MM`), counted in SQL:
    the local month starts between the first and the last enrolment, as UTC instants, bucket
    the rows in one grouped statement (not one time-zone conversion per member in Python)."""
    counted = (Member.program_id == program.id, Member.status != "merged")
    first, last = session.execute(
        select(func.min(Member.enrolled_at), func.max(Member.enrolled_at)).where(*counted)
    ).one()
    if first is None or last is None:
        return {}
    month = calendar.local_date(first, program.timezone).replace(day=1)
    final = calendar.local_date(last, program.timezone).replace(day=1)
    starts: list[tuple[str, datetime]] = []
    while month <= final:
        starts.append((month.strftime("%Y-%m"), calendar.start_of_day(month, program.timezone)))
        month = calendar.add_months(month, 1)
    if len(starts) == 1:
        return {starts[0][0]: int(session.scalar(select(func.count()).where(*counted)) or 0)}
    # The latest month whose start the enrolment reached: conditions from the last month back.
    months = (
        select(
            case(
                *((Member.enrolled_at >= start, name) for name, start in reversed(starts[1:])),
                else_=starts[0][0],
            ).label("month")
        )
        .where(*counted)
        .subquery()
    )
    return {
        str(name): int(count)
        for name, count in session.execute(
            select(months.c.month, func.count()).group_by(months.c.month)
        )
    }


def kpis(
    session: Session, warehouse: Warehouse, *, program_id: str, now: datetime | None = None
) -> KpiRead:
    """Programme KPIs: members, points flows, liability, breakage, tiers, member vs non-member."""
    program = get_program(session, program_id=program_id)
    now = now or utcnow()
    month_ago = now - timedelta(days=30)
    in_program = Member.program_id == program.id
    members = (
        session.scalar(
            select(func.count()).select_from(Member).where(in_program, Member.status != "merged")
        )
        or 0
    )
    # A merged-away membership's entries stay its own: they count for its survivor.
    active = (
        session.scalar(
            select(func.count(func.distinct(func.coalesce(Member.merged_into, Member.id))))
            .select_from(LedgerEntry)
            .join(Member, Member.id == LedgerEntry.member_id)
            .where(
                LedgerEntry.program_id == program.id,
                LedgerEntry.kind.in_(["earn", "redeem"]),
                LedgerEntry.occurred_at >= month_ago,
            )
        )
        or 0
    )
    by_month = _enrolment_by_month(session, program=program)
    # Manual adjustments apart by sign: a credit by hand is issued, a debit by hand is not
    # negative issuance (as in `points_flow_select`, the dashboards' figure).
    flow = case(
        ((LedgerEntry.kind == "adjust") & (LedgerEntry.points > 0), "adjust+"),
        else_=LedgerEntry.kind,
    )
    flows: dict[str, int | None] = dict(
        session.execute(
            select(flow, func.sum(LedgerEntry.points))
            .where(LedgerEntry.program_id == program.id)
            .group_by(flow)
        ).all()
    )
    issued = sum(int(flows.get(k) or 0) for k in ("earn", "import", "bonus", "adjust+"))
    redeemed = -int(flows.get("redeem") or 0) - int(flows.get("refund") or 0)
    expired = -int(flows.get("expire") or 0)
    reversed_ = -int(flows.get("reverse") or 0)
    outstanding = int(
        session.scalar(
            select(func.coalesce(func.sum(Lot.remaining), 0)).where(
                Lot.program_id == program.id,
                (Lot.expires_at.is_(None)) | (Lot.expires_at > now),
            )
        )
        or 0
    )
    ladder = {t.id: t.name for t in tiers.ladder(session, program_id=program.id)}
    distribution = {
        (ladder.get(tier_id, "none") if tier_id else "none"): int(count)
        for tier_id, count in session.execute(
            select(Member.tier_id, func.count())
            .where(in_program, Member.status == "active")
            .group_by(Member.tier_id)
        ).all()
    }
    movements = {
        str(reason): int(count)
        for reason, count in session.execute(
            select(TierChange.reason, func.count())
            .where(TierChange.program_id == program.id, TierChange.at >= month_ago)
            .group_by(TierChange.reason)
        ).all()
    }
    year_ago = now - timedelta(days=365)
    member_orders, member_amount, member_buyers = session.execute(
        select(
            func.coalesce(func.sum(Activity.orders), 0),
            func.coalesce(func.sum(Activity.spend), 0.0),
            func.count(func.distinct(Activity.member_id)),
        ).where(
            Activity.program_id == program.id,
            Activity.occurred_at >= year_ago,
            Activity.orders > 0,
        )
    ).one()
    totals = warehouse.run(
        queries.order_totals(
            since=year_ago.replace(tzinfo=None),
            until=now.replace(tzinfo=None),
            event_profiles=identity_service.event_profile_sql(),
        )
    ).row(0, named=True)
    other_orders = max(int(totals["orders"]) - int(member_orders), 0)
    other_amount = max(float(totals["amount"]) - float(member_amount), 0.0)
    other_buyers = max(int(totals["buyers"]) - int(member_buyers), 0)
    return KpiRead(
        program_id=program.id,
        at=now,
        members=int(members),
        active_members_30d=int(active),
        enrolment_by_month=[CountAt(period=k, count=v) for k, v in sorted(by_month.items())],
        points_issued=issued,
        points_redeemed=redeemed,
        points_expired=expired,
        points_reversed=reversed_,
        points_outstanding=outstanding,
        liability=round(outstanding * program.point_value, 2),
        currency=program.currency,
        breakage_rate=expired / issued if issued else None,
        redemption_rate=redeemed / issued if issued else None,
        tier_distribution=distribution,
        tier_movements_30d=movements,
        member_orders=int(member_orders),
        member_average_basket=float(member_amount) / int(member_orders) if member_orders else None,
        member_purchase_frequency=int(member_orders) / int(member_buyers)
        if member_buyers
        else None,
        non_member_orders=other_orders,
        non_member_average_basket=other_amount / other_orders if other_orders else None,
        non_member_purchase_frequency=other_orders / other_buyers if other_buyers else None,
    )


DEMO_RULES: tuple[dict[str, Any], ...] = (  # Any: rule JSON
    {
        "name": "1 point per euro, double on shoes",
        "event_name": "Order Completed",
        "formula": {
            "type": "per_line",
            "rate": 1,
            "lines": [{"match": {"category": ["shoes"]}, "multiplier": 2}],
        },
    },
    {
        "name": "First purchase bonus",
        "event_name": "Order Completed",
        "formula": {"type": "fixed", "points": 100},
        "limit_per_member": 1,
        "apply_tier_multiplier": False,
    },
)
DEMO_TIERS = (("Silver", 1, 200.0, 1.0), ("Gold", 2, 1000.0, 1.25), ("Platinum", 3, 3000.0, 1.5))
DEMO_REWARDS = (("5 EUR voucher", "coupon", 500, None), ("Tote bag", "product", 1200, 100))


def create_demo_program(
    session: Session, *, timezone: str = "Europe/Paris", status: ProgramStatus = "active"
) -> Program:
    """The demo programme: 1 point per euro (double on shoes), a first-purchase bonus,
    Silver/Gold/Platinum tiers on points over 12 months, and a small reward catalogue.

    `cdp demo` creates it as a draft and activates it once its history is loaded and resolved.
    """
    program = create_program(
        session,
        data=ProgramCreate(
            name="Demo Club",
            status=status,
            enrolment="automatic",
            timezone=timezone,
            pending_days=14,
            expiry_policy="rolling",
            expiry_months=24,
            point_value=0.01,
        ),
    )
    for rule in DEMO_RULES:
        create_rule(session, program_id=program.id, data=RuleCreate(**rule))
    tiers_by_name = {
        name: create_tier(
            session,
            program_id=program.id,
            data=TierCreate(
                name=name,
                rank=rank,
                threshold=threshold,
                multiplier=multiplier,
                benefits=[f"{name} members: private sales"] if rank > 1 else [],
            ),
        )
        for name, rank, threshold, multiplier in DEMO_TIERS
    }
    for name, kind, cost, stock in DEMO_REWARDS:
        create_reward(
            session,
            program_id=program.id,
            data=RewardCreate(name=name, kind=kind, points_cost=cost, stock=stock),
        )
    create_reward(
        session,
        program_id=program.id,
        data=RewardCreate(
            name="Private sale access",
            kind="event_access",
            points_cost=300,
            min_tier_id=tiers_by_name["Gold"].id,
        ),
    )
    return program


TIER_DIRECTIONS = ("upgrades", "downgrades")


def tier_movements_select(
    *, start: datetime, end_excl: datetime, period: PeriodOf, program_id: str | None
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: tier changes per period, `upgrades` or `downgrades` (read-only).

    A change is an upgrade when the new tier ranks above the old one (no tier ranks 0), a
    downgrade when below; changes that keep the rank are not movements.
    """
    old, new = aliased(Tier), aliased(Tier)
    old_rank = func.coalesce(old.rank, 0)
    new_rank = func.coalesce(new.rank, 0)
    when = period(TierChange.at).label("period")
    key = case((new_rank > old_rank, "upgrades"), else_="downgrades").label("key")
    query = (
        select(when, key, func.count().label("value"))
        .select_from(TierChange)
        .outerjoin(old, old.id == TierChange.from_tier_id)
        .outerjoin(new, new.id == TierChange.to_tier_id)
        .where(TierChange.at >= start, TierChange.at < end_excl, new_rank != old_rank)
        .group_by(when, key)
        .order_by(when, key)
    )
    if program_id is not None:
        query = query.where(TierChange.program_id == program_id)
    return query


def reward_redemptions_select(
    *, start: datetime, end_excl: datetime, period: PeriodOf, program_id: str | None
) -> Select[Any]:  # Any: period, key, value columns
    """`period, key, value`: redemptions per reward name per period, cancelled ones excluded
    (read-only)."""
    when = period(Redemption.created_at).label("period")
    key = Reward.name.label("key")
    query = (
        select(when, key, func.count().label("value"))
        .select_from(Redemption)
        .join(Reward, Reward.id == Redemption.reward_id)
        .where(
            Redemption.created_at >= start,
            Redemption.created_at < end_excl,
            Redemption.status != "cancelled",
        )
        .group_by(when, key)
        .order_by(when, key)
    )
    if program_id is not None:
        query = query.where(Redemption.program_id == program_id)
    return query
