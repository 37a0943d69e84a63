"""Use cases of the identity package: the only module other packages may import."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import polars as pl
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cdp.config import Settings
from cdp.db import utcnow
from cdp.identifiers import normalise
from cdp.warehouse import Warehouse
from identity import queries, resolver
from identity.errors import (
    IdentifierNotFound,
    InvalidIdentifier,
    InvalidRules,
    InvalidTraitFilter,
    NothingToUnmerge,
    OverrideNotFound,
    ProfileNotFound,
    SuppressionNotFound,
)
from identity.models import IdentityAudit, IdentityRuleSet
from identity.resolver import ResolveResult
from identity.rules import IdentityRules
from identity.schemas import (
    AuditRead,
    BlockedIdentifierRead,
    BlockReason,
    DecisionRead,
    ErasureRead,
    EventRead,
    IdentifierRead,
    IdentifierRef,
    IdentityExplanation,
    LinkRead,
    MergeRead,
    OverrideRead,
    ProfileExport,
    ProfileRead,
    ResolveRead,
    UnmergeCreate,
    UnmergeRead,
)

logger = logging.getLogger(__name__)

__all__ = [
    "IdentityRules",
    "ResolveResult",
    "allow_again",
    "allow_identifier",
    "erase_profile",
    "erasures_since",
    "event_profiles",
    "explain_identity",
    "export_profile",
    "find_profile",
    "get_profile",
    "get_rules",
    "list_audit",
    "list_blocked",
    "list_overrides",
    "lookup",
    "merges_since",
    "profile_events",
    "profiles_version_sql",
    "put_rules",
    "resolve",
    "resolve_profile_id",
    "search_profiles",
    "unmerge",
]


RULES_ROW = 1


def get_rules(session: Session) -> IdentityRules:
    """The resolution rules in force (the defaults until someone saves rules)."""
    row = session.get(IdentityRuleSet, RULES_ROW)
    return IdentityRules() if row is None else IdentityRules.model_validate(row.document)


def put_rules(
    session: Session,
    warehouse: Warehouse,
    *,
    rules: IdentityRules,
    updated_by: str | None,
) -> IdentityRules:
    """Replace the rules; the next resolution rebuilds the graph under them.

    Blocked patterns run in the warehouse (RE2), which rejects some patterns Python's `re`
    compiles (look-arounds, backreferences): each is compiled there first, so a pattern that
    would fail every later resolution run is refused (InvalidRules) instead of saved.
    """
    for pattern in rules.blocked_patterns:
        if not warehouse.scalar(queries.pattern_runs(pattern)):
            raise InvalidRules(
                f"blocked pattern `{pattern}` is not a valid RE2 regular expression "
                "(no look-arounds or backreferences)"
            )
    row = session.get(IdentityRuleSet, RULES_ROW)
    document = rules.model_dump(mode="json")
    if row is None:
        session.add(
            IdentityRuleSet(
                id=RULES_ROW, document=document, updated_at=utcnow(), updated_by=updated_by
            )
        )
    else:
        row.document = document
        row.updated_at = utcnow()
        row.updated_by = updated_by
    logger.info("identity rules saved", extra={"fingerprint": rules.fingerprint()})
    return rules


def resolve(
    warehouse: Warehouse, *, settings: Settings, rules: IdentityRules, full: bool = False
) -> ResolveResult:
    """Resolve new events into profiles (incremental), or rebuild everything (`full`)."""
    del settings  # part of the contract; resolution needs nothing from it yet
    return resolver.resolve(warehouse, rules=rules, full=full)


def lookup(warehouse: Warehouse, *, kind: str, value: str) -> str | None:
    """The profile id holding a normalised identifier, or None."""
    rows = warehouse.rows(queries.lookup(kind, value))
    return str(rows[0][0]) if rows and rows[0][0] is not None else None


def lookup_identifier(
    warehouse: Warehouse, *, settings: Settings, kind: str, value: str
) -> str | None:
    """The profile holding an identifier given as typed (normalised first), or None."""
    normalised = normalise(kind, value, region=settings.default_phone_region)
    return None if normalised is None else lookup(warehouse, kind=kind, value=normalised)


def lookup_identifiers(
    warehouse: Warehouse, *, settings: Settings, kinds: list[str], values: list[str | None]
) -> list[str | None]:
    """The profile holding each identifier given as typed (normalised first), in order;
    None where the value is not usable or no profile holds it. One query for the lot."""
    normalised = [
        normalise(kind, value, region=settings.default_phone_region)
        for kind, value in zip(kinds, values, strict=True)
    ]
    frame = pl.DataFrame(
        {"row": range(len(kinds)), "kind": kinds, "value": normalised},
        schema={"row": pl.Int64, "kind": pl.String, "value": pl.String},
    )
    return _by_row(warehouse, frame, queries.LOOKUP_MANY)


def live_profile_ids(warehouse: Warehouse, *, profile_ids: list[str]) -> list[str | None]:
    """Each profile id's live profile (following merges), in order; None if never issued."""
    frame = pl.DataFrame(
        {"row": range(len(profile_ids)), "profile_id": profile_ids},
        schema={"row": pl.Int64, "profile_id": pl.String},
    )
    return _by_row(warehouse, frame, queries.LIVE_PROFILE_IDS)


def _by_row(warehouse: Warehouse, frame: pl.DataFrame, sql: str) -> list[str | None]:
    if frame.is_empty():
        return []
    with warehouse.cursor() as cur:
        cur.register("id_lookup_frame", frame)
        try:
            rows = cur.execute(sql).fetchall()
        finally:
            cur.unregister("id_lookup_frame")
    return [None if profile is None else str(profile) for _, profile in rows]


def resolved_up_to(warehouse: Warehouse) -> int:
    """The highest event id resolution has processed (0 before the first run).

    Later layers that key events by profile must not read past it: an event above the mark
    has no profile yet.
    """
    state = {str(r[0]): r[1] for r in warehouse.rows(queries.read_state())}
    return int(state.get(queries.STATE_MARK) or 0)


def resolve_profile_id(warehouse: Warehouse, *, profile_id: str) -> str:
    """The live profile id for an id, following merges; ProfileNotFound if never issued."""
    rows = warehouse.rows(queries.profile_id_record(profile_id))
    if not rows:
        raise ProfileNotFound(f"profile {profile_id} does not exist")
    merged_into = rows[0][1]
    return str(merged_into) if merged_into is not None else profile_id


def event_profiles(
    warehouse: Warehouse, *, after_event_id: int, up_to_event_id: int | None = None
) -> pl.DataFrame:
    """`event_id, profile_id` of the resolved events in `(after_event_id, up_to_event_id]`."""
    return warehouse.run(queries.event_profiles(after_event_id, up_to_event_id))


def merges_since(warehouse: Warehouse, *, after_seq: int) -> pl.DataFrame:
    """Published merges and splits after `after_seq`, in order.

    Columns: seq, kind ('merge' | 'split'), from_profile_id, to_profile_id, at, reason.
    """
    return warehouse.run(queries.merges_since(after_seq))


def find_profile(warehouse: Warehouse, *, settings: Settings, kind: str, value: str) -> ProfileRead:
    """The profile holding an identifier given as typed (normalised here first)."""
    normalised = normalise(kind, value, region=settings.default_phone_region)
    if normalised is None:
        raise InvalidIdentifier(f"{value!r} is not a usable {kind}")
    profile_id = lookup(warehouse, kind=kind, value=normalised)
    if profile_id is None:
        raise IdentifierNotFound(f"no profile holds {kind} {normalised!r}")
    # A node always holds its live profile id (merges move nodes in the same transaction),
    # so the lookup skips the redirect query.
    return _live_profile(warehouse, live=profile_id, requested=profile_id)


# Any: attribute values are numbers, strings, booleans or timestamps.
AttributesProvider = Callable[[Warehouse, str], dict[str, Any] | None]

# Who computes a profile's attributes. Identity must not import the layers above it, so the
# composition root (`cdp/app.py`) registers segments' `profile_attributes` here.
_attributes_provider: list[AttributesProvider] = []


# Any: a JSON-ready document. What another layer holds about a person, for the export:
# `section(session, warehouse, live_profile_id)`. Identity imports no layer above it, so the
# composition root (`cdp/app.py`) registers loyalty's and segments' sections here.
ExportSection = Callable[[Session, Warehouse, str], Any]
_export_sections: dict[str, ExportSection] = {}


def register_export_section(name: str, section: ExportSection) -> None:
    """Add (or replace) a named section of `export_profile`'s `held_by` document."""
    _export_sections[name] = section


def register_attributes_provider(provider: AttributesProvider | None) -> None:
    """Set (or clear, with None) the function `get_profile` asks for a profile's attributes.

    `provider(warehouse, live_profile_id)` returns the attributes, or None when none are
    computed for that profile.
    """
    _attributes_provider.clear()
    if provider is not None:
        _attributes_provider.append(provider)


def get_profile(warehouse: Warehouse, *, profile_id: str) -> ProfileRead:
    """A profile by id; a merged-away id answers with its survivor (and says so).

    `attributes` holds what the registered attributes provider says about the live profile
    (computed attributes), or None without a provider or before a computation.
    """
    live = resolve_profile_id(warehouse, profile_id=profile_id)
    return _live_profile(warehouse, live=live, requested=profile_id)


def has_data(warehouse: Warehouse, *, profile_id: str) -> bool:
    """Whether a live profile id holds anything now: False once it was erased, or while all
    its identifiers are blocked or capped (its id is kept, its row is not)."""
    return bool(warehouse.rows(queries.profile_row(profile_id)))


def _live_profile(warehouse: Warehouse, *, live: str, requested: str) -> ProfileRead:
    # One small row: fetched as a tuple (a Polars frame costs more than the query here).
    rows = warehouse.rows(queries.profile_row(live))
    if not rows:
        raise ProfileNotFound(f"profile {requested} has no identifiers left")
    profile = _profile(
        dict(zip(queries.PROFILE_ROW_COLUMNS, rows[0], strict=True)), requested=requested
    )
    if _attributes_provider:
        profile.attributes = _attributes_provider[0](warehouse, profile.id)
    return profile


def profile_events(
    warehouse: Warehouse,
    *,
    profile_id: str,
    event: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[EventRead], int]:
    """A page of a profile's timeline (newest first) and the total, after redirects."""
    live = resolve_profile_id(warehouse, profile_id=profile_id)
    page, total = queries.profile_events(
        live, event=event, since=_naive(since), until=_naive(until), limit=limit, offset=offset
    )
    items = [_event(row) for row in warehouse.run(page).iter_rows(named=True)]
    return items, int(warehouse.scalar(total))


def explain_identity(warehouse: Warehouse, *, profile_id: str) -> IdentityExplanation:
    """Identifiers, links with their events, merges and rule decisions of a profile."""
    live = resolve_profile_id(warehouse, profile_id=profile_id)
    identifiers = [
        IdentifierRead(
            **{
                **row,
                "first_seen": _aware(row["first_seen"]),
                "last_seen": _aware(row["last_seen"]),
            }
        )
        for row in warehouse.run(queries.profile_nodes(live)).iter_rows(named=True)
    ]
    links = [
        LinkRead(**{**row, "linked_at": _aware(row["linked_at"])})
        for row in warehouse.run(queries.profile_links(live)).iter_rows(named=True)
    ]
    history = [
        MergeRead(**{**row, "at": _aware(row["at"])})
        for row in warehouse.run(queries.profile_history(live)).iter_rows(named=True)
    ]
    decisions = [
        DecisionRead(**{**row, "decided_at": _aware(row["decided_at"])})
        for row in warehouse.run(queries.profile_decisions(live)).iter_rows(named=True)
    ]
    return IdentityExplanation(
        profile_id=live, identifiers=identifiers, links=links, history=history, decisions=decisions
    )


def search_profiles(
    warehouse: Warehouse,
    *,
    traits: dict[str, str],
    seen_after: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[ProfileRead], int]:
    """Profiles whose traits equal every given value (as text), latest activity first.

    A key is a top-level trait name taken literally (`a.b`, `$x` and `/x` are names, not
    JSON paths); an empty key raises InvalidTraitFilter.
    """
    if any(not name for name in traits):
        raise InvalidTraitFilter("a trait filter needs a trait name")
    page, total = queries.search_profiles(
        traits, seen_after=_naive(seen_after), limit=limit, offset=offset
    )
    items = [
        _profile(row, requested=row["profile_id"])
        for row in warehouse.run(page).iter_rows(named=True)
    ]
    return items, int(warehouse.scalar(total))


def _profile(row: dict[str, Any], *, requested: str) -> ProfileRead:  # Any: SQL values
    return ProfileRead(
        id=row["profile_id"],
        requested_id=requested,
        redirected=requested != row["profile_id"],
        created_at=_aware(row["created_at"]),
        updated_at=_aware(row["updated_at"]),
        first_seen=_aware(row["first_seen"]),
        last_seen=_aware(row["last_seen"]),
        event_count=row["event_count"],
        identifiers=_json(row["identifiers"]) or {},
        traits=_json(row["traits"]) or {},
    )


def _json(text: str | None) -> Any:  # Any: JSON value
    return None if text is None else orjson.loads(text)


def _aware(value: datetime | None) -> datetime | None:
    """Warehouse timestamps are naive UTC; the API speaks aware UTC."""
    return None if value is None else value.replace(tzinfo=UTC)


def _naive(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def unmerge(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    profile_id: str,
    request: UnmergeCreate,
    actor: str | None,
) -> UnmergeRead:
    """Detach an identifier from, or remove a link of, a profile, then re-resolve (it splits).

    The decision is kept: later events do not re-create the link until an admin allows it.
    """
    live = resolve_profile_id(warehouse, profile_id=profile_id)
    if (request.identifier is None) == (request.link is None):
        raise NothingToUnmerge("name exactly one of `identifier` or `link`")
    before = [int(r[0]) for r in warehouse.rows(queries.profile_nodes(live))]
    if request.identifier is not None:
        node, owner = _node(warehouse, settings, request.identifier)
        if owner != live:
            raise NothingToUnmerge(f"the identifier is not in profile {live}")
        action, src, dst = "remove_identifier", node, None
    else:
        assert request.link is not None
        a, owner_a = _node(warehouse, settings, request.link.from_)
        b, owner_b = _node(warehouse, settings, request.link.to)
        if live not in (owner_a, owner_b) or not warehouse.scalar(queries.link_exists(a, b)):
            raise NothingToUnmerge(f"no such link on profile {live}")
        action, src, dst = "remove_link", a, b
    override_id = int(
        warehouse.rows(
            queries.add_override(
                action=action,
                src=src,
                dst=dst,
                profile_id=live,
                reason=request.reason,
                actor=actor,
                at=_naive_now(),
            )
        )[0][0]
    )
    logger.info("identity unmerge", extra={"profile_id": live, "action": action, "actor": actor})
    result = resolve(warehouse, settings=settings, rules=get_rules(session))
    pieces = [str(r[0]) for r in warehouse.rows(queries.profiles_of_nodes(before))]
    return UnmergeRead(
        override_id=override_id,
        profiles=pieces,
        resolution=ResolveRead.model_validate(result.as_dict()),
    )


def allow_again(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    override_id: int,
    actor: str | None,
) -> ResolveRead:
    """Lift an unmerge decision (the identifier or link links again) and re-resolve."""
    if not warehouse.rows(queries.lift_override(override_id, actor=actor, at=_naive_now())):
        raise OverrideNotFound(f"no active unmerge decision {override_id}")
    result = resolve(warehouse, settings=settings, rules=get_rules(session))
    return ResolveRead.model_validate(result.as_dict())


def list_overrides(
    warehouse: Warehouse, *, limit: int, offset: int
) -> tuple[list[OverrideRead], int]:
    """Unmerge decisions, newest first."""
    frame = warehouse.run(queries.list_overrides(limit, offset))
    items = [
        OverrideRead(
            **{
                **row,
                "created_at": _aware(row["created_at"]),
                "lifted_at": _aware(row["lifted_at"]),
            }
        )
        for row in frame.iter_rows(named=True)
    ]
    return items, int(warehouse.scalar(queries.COUNT_OVERRIDES))


def list_blocked(
    session: Session,
    warehouse: Warehouse,
    *,
    kind: str | None = None,
    reason: BlockReason | None = None,
    limit: int,
    offset: int,
) -> tuple[list[BlockedIdentifierRead], int]:
    """Identifiers the rules leave out of resolution (blocked or capped), most events first.

    A blocked or capped identifier belongs to no profile, so no profile's explanation lists
    it unless a profile is linked to it: this is where an operator sees every one, with why
    (the list or pattern of the rules in force, or the higher-priority identifiers it is
    linked to against the cap).
    """
    rules = get_rules(session)
    page, total = queries.blocked_identifiers(
        kind=kind,
        reason=reason,
        blocked_values=rules.blocked_values,
        blocked_patterns=rules.blocked_patterns,
        cap=rules.auto_cap,
        limit=limit,
        offset=offset,
    )
    items = [
        BlockedIdentifierRead(
            **{
                **row,
                "first_seen": _aware(row["first_seen"]),
                "last_seen": _aware(row["last_seen"]),
            }
        )
        for row in warehouse.run(page).iter_rows(named=True)
    ]
    return items, int(warehouse.scalar(total))


def _node(warehouse: Warehouse, settings: Settings, ref: IdentifierRef) -> tuple[int, str | None]:
    value = normalise(ref.kind, ref.value, region=settings.default_phone_region)
    if value is None:
        raise InvalidIdentifier(f"{ref.value!r} is not a usable {ref.kind}")
    rows = warehouse.rows(queries.node_of(ref.kind, value))
    if not rows:
        raise IdentifierNotFound(f"no identifier {ref.kind} {value!r}")
    return int(rows[0][0]), rows[0][1]


def _naive_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def erase_profile(
    session: Session, warehouse: Warehouse, *, profile_id: str, actor: str | None
) -> ErasureRead:
    """Erase a person: events, identifiers, traits; suppress the identifiers; audit it.

    The erasure is published (`erasures_since`) so loyalty anonymises its records. What it
    changes for the others (an identifier back under the cap, links only the erased events
    made) is re-resolved in the same transaction.
    """
    live = resolve_profile_id(warehouse, profile_id=profile_id)
    events, identifiers = resolver.erase(
        warehouse, rules=get_rules(session), profile_id=live, at=_naive_now()
    )
    erasure = ErasureRead(
        profile_id=live,
        events_erased=events,
        identifiers_erased=identifiers,
        suppressed=identifiers,
    )
    _audit(session, "erase", live, actor, erasure.model_dump(mode="json"))
    logger.info("profile erased", extra={"profile_id": live, "actor": actor})
    return erasure


def export_profile(
    session: Session, warehouse: Warehouse, *, profile_id: str, actor: str | None
) -> ProfileExport:
    """Everything held about a person, as one document; audited. `held_by` has what the
    other layers hold (registered sections: loyalty memberships and ledgers, segment
    memberships and their history)."""
    profile = get_profile(warehouse, profile_id=profile_id)
    events = [
        _event(row)
        for row in warehouse.run(queries.all_profile_events(profile.id)).iter_rows(named=True)
    ]
    export = ProfileExport(
        exported_at=datetime.now(UTC),
        profile=profile,
        identity=explain_identity(warehouse, profile_id=profile.id),
        events=events,
        held_by={
            name: section(session, warehouse, profile.id)
            for name, section in sorted(_export_sections.items())
        },
    )
    _audit(
        session,
        "export",
        profile.id,
        actor,
        {"events": len(events), "sections": sorted(_export_sections)},
    )
    return export


def allow_identifier(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: Settings,
    kind: str,
    value: str,
    actor: str | None,
) -> None:
    """Lift the suppression of an erased identifier after a new consent; audited."""
    normalised = normalise(kind, value, region=settings.default_phone_region)
    if normalised is None:
        raise InvalidIdentifier(f"{value!r} is not a usable {kind}")
    lifted = warehouse.rows(queries.lift_suppression(kind, normalised, _naive_now()))
    if not lifted:
        raise SuppressionNotFound(f"{kind} {normalised!r} is not suppressed")
    _audit(session, "consent", "-", actor, {"kind": kind})


def erasures_since(warehouse: Warehouse, *, after_seq: int) -> pl.DataFrame:
    """Published erasures after `after_seq`: columns seq, profile_id, at."""
    return warehouse.run(queries.erasures_since(after_seq))


def list_audit(session: Session, *, limit: int, offset: int) -> tuple[list[AuditRead], int]:
    """Privacy operations, newest first."""
    total = session.scalar(select(func.count()).select_from(IdentityAudit)) or 0
    rows = session.scalars(
        select(IdentityAudit)
        .order_by(IdentityAudit.at.desc(), IdentityAudit.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return [AuditRead.model_validate(r, from_attributes=True) for r in rows], total


def _audit(
    session: Session,
    action: str,
    profile_id: str,
    actor: str | None,
    details: dict[str, Any],  # Any: JSON
) -> None:
    session.add(
        IdentityAudit(
            action=action, profile_id=profile_id, actor=actor, at=utcnow(), details=details
        )
    )
    session.flush()


def _event(row: dict[str, Any]) -> EventRead:  # Any: SQL values
    return EventRead(
        **{
            **row,
            "timestamp": _aware(row["timestamp"]),
            "received_at": _aware(row["received_at"]),
            "properties": _json(row["properties"]),
            "traits": _json(row["traits"]),
            "context": _json(row["context"]),
        }
    )


def event_profile_sql() -> str:
    """A parameter-free SQL relation `(event_id, profile_id)`: the profile of each resolved event.

    For set-based joins by later layers (segments); same rule as `event_profiles`: an event
    belongs to the profile of its most trusted identifier that has one.
    """
    return queries.EVENT_PROFILE_RELATION


def profiles_version_sql() -> str:
    """A parameter-free SQL query returning one number that changes whenever `profiles` does.

    Every identity write to `profiles` (a resolution, an unmerge's re-resolution, an erasure)
    bumps it in the same transaction, so a later layer can tell whether profiles changed
    without scanning them. Never goes back; 0 before the first resolution.
    """
    return queries.PROFILES_VERSION_SQL


def scoped_event_profile_sql() -> str:
    """`event_profile_sql()` limited to the events of a relation named `scoped_events`.

    Read-only, for set-based joins over a slice of the events (the dashboards' orders of a
    date range): the caller defines `scoped_events` (a CTE with an `event_id` column) in the
    same statement.
    """
    return queries.SCOPED_EVENT_PROFILE_RELATION
