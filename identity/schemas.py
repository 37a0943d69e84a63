"""API models of the identity package."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from identity.rules import IdentityRules


class ProfileRead(BaseModel):
    """A unified profile: its identifiers by kind and its traits after survivorship."""

    id: str
    requested_id: str = Field(description="The id asked for; differs from `id` after a merge")
    redirected: bool = Field(description="The requested id was merged into this profile")
    created_at: datetime
    updated_at: datetime
    first_seen: datetime | None
    last_seen: datetime | None
    event_count: int
    identifiers: dict[str, list[str]]
    traits: dict[str, Any]  # Any: JSON trait values
    attributes: dict[str, Any] | None = Field(  # Any: attribute values
        default=None,
        description="Computed attributes (with `computed_at`) when computed; only on the "
        "single-profile routes",
    )


class EventRead(BaseModel):
    """One event of a profile's timeline."""

    event_id: int
    message_id: str
    source_id: str
    type: str
    event: str | None
    timestamp: datetime
    received_at: datetime
    properties: dict[str, Any] | None  # Any: JSON
    traits: dict[str, Any] | None  # Any: JSON
    context: dict[str, Any] | None  # Any: JSON


class IdentifierRead(BaseModel):
    """An identifier of a profile."""

    kind: str
    value: str
    status: str
    first_event_id: int
    first_seen: datetime
    last_seen: datetime


class LinkRead(BaseModel):
    """A link between two identifiers and the event that first created it."""

    from_kind: str
    from_value: str
    to_kind: str
    to_value: str
    event_id: int
    linked_at: datetime
    used: bool = Field(
        description="False when refused by a rule, removed, across profiles, or when an end "
        "is blocked or capped (its decision is then among the profile's decisions)"
    )


class MergeRead(BaseModel):
    """A published merge or split."""

    seq: int
    kind: str
    from_profile_id: str
    to_profile_id: str
    at: datetime
    reason: str
    event_id: int | None


class DecisionRead(BaseModel):
    """A rule decision: a link not used, or an identifier blocked."""

    decision: str
    kind: str
    value: str
    other_kind: str | None
    other_value: str | None
    event_id: int | None
    detail: str
    decided_at: datetime


class IdentityExplanation(BaseModel):
    """Why a profile looks as it does: identifiers, links, merges and rule decisions."""

    profile_id: str
    identifiers: list[IdentifierRead]
    links: list[LinkRead]
    history: list[MergeRead]
    decisions: list[DecisionRead]


class RulesRead(IdentityRules):
    """The resolution rules in force."""


class RulesUpdate(IdentityRules):
    """New resolution rules; the next resolution rebuilds the profiles under them."""


class ResolveRead(BaseModel):
    """What a resolution run did."""

    mode: str
    up_to_event_id: int
    events: int
    new_identifiers: int
    new_links: int
    affected_identifiers: int
    profiles_written: int
    new_profiles: int
    merges: int
    splits: int
    rule_components: int
    refused_links: int
    excluded_identifiers: int
    labelling_seconds: float
    seconds: float


class IdentifierRef(BaseModel):
    """An identifier named in a request (normalised before use)."""

    kind: str = Field(min_length=1)
    value: str = Field(min_length=1)


class LinkRef(BaseModel):
    """A link between two identifiers."""

    from_: IdentifierRef = Field(alias="from")
    to: IdentifierRef


class UnmergeCreate(BaseModel):
    """Undo a wrong merge: detach one identifier from every link, or remove one link."""

    identifier: IdentifierRef | None = None
    link: LinkRef | None = None
    reason: str | None = Field(default=None, max_length=500)


class UnmergeRead(BaseModel):
    """The outcome of an unmerge: the override recorded and the profiles it left."""

    override_id: int
    profiles: list[str] = Field(description="Live profiles now holding the old identifiers")
    resolution: ResolveRead


class OverrideRead(BaseModel):
    """An admin's unmerge decision and whether it still holds."""

    override_id: int
    action: str
    kind: str | None
    value: str | None
    other_kind: str | None
    other_value: str | None
    profile_id: str | None
    reason: str | None
    created_at: datetime
    created_by: str | None
    lifted_at: datetime | None
    lifted_by: str | None


BlockReason = Literal["blocked", "capped"]


class BlockedIdentifierRead(BaseModel):
    """An identifier the rules leave out of resolution, and why."""

    kind: str
    value: str
    reason: BlockReason = Field(
        description="`blocked`: a blocked value or pattern; `capped`: linked to more distinct "
        "higher-priority identifiers than `auto_cap`"
    )
    blocked_by: Literal["value", "pattern"] | None = Field(
        description="blocked: the blocked values list or a pattern (null if the rules in "
        "force no longer block it: the next run rebuilds under them)"
    )
    pattern: str | None = Field(description="blocked by a pattern: the first that matches")
    higher_priority_ids: int | None = Field(
        description="capped: distinct higher-priority identifiers (not blocked) it is linked to"
    )
    cap: int | None = Field(description="capped: the `auto_cap` in force")
    events: int = Field(description="Events carrying the identifier")
    first_seen: datetime
    last_seen: datetime


class ErasureRead(BaseModel):
    """What an erasure removed."""

    profile_id: str
    events_erased: int
    identifiers_erased: int
    suppressed: int = Field(description="Identifier hashes added to the suppression list")


class ProfileExport(BaseModel):
    """Everything held about a person."""

    exported_at: datetime
    profile: ProfileRead
    identity: IdentityExplanation
    events: list[EventRead]
    # Any: each layer's own document (e.g. "loyalty", "segments").
    held_by: dict[str, Any] = Field(
        default_factory=dict,
        description="what the other layers hold about the person, by layer",
    )


class ConsentCreate(BaseModel):
    """An erased person came back with a new consent: their identifier may resolve again."""

    kind: str = Field(min_length=1)
    value: str = Field(min_length=1)


class AuditRead(BaseModel):
    """One privacy operation."""

    id: str
    action: str
    profile_id: str
    actor: str | None
    at: datetime
    details: dict[str, Any]  # Any: JSON
