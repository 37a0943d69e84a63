"""API models of the segments package."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cdp.db import Instant
from segments.rules import AttributeDefinition, FieldType

RULE_DESCRIPTION = (
    "A rule document: {all: [...]}, {any: [...]}, {not: {...}}, "
    "{field, op, value}, {event, performed, where, count, last_days | since/until}, "
    "{segment, member}. JSON schema at GET /api/segments/rule-schema; see docs/segments.md."
)


class AttributeCreate(BaseModel):
    """Body of an attribute definition."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=63, examples=["spend_shoes_90d"])
    description: str | None = Field(default=None, max_length=2000)
    definition: AttributeDefinition


class AttributeUpdate(BaseModel):
    """Body of an attribute change."""

    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(default=None, max_length=2000)
    definition: AttributeDefinition


class AttributeRead(BaseModel):
    """A computed attribute."""

    name: str
    description: str | None
    builtin: bool
    type: FieldType
    definition: AttributeDefinition
    created_at: datetime | None
    updated_at: datetime | None
    updated_by: str | None


class AttributeRefreshRead(BaseModel):
    """What a refresh of the attributes did."""

    profiles: int
    attributes: int
    computed_at: datetime
    seconds: float


class CatalogFieldRead(BaseModel):
    """A field rules may compare."""

    name: str
    type: FieldType
    kind: str
    description: str
    ops: list[str]


class CatalogPropertyRead(BaseModel):
    """A property of an event."""

    name: str
    type: FieldType
    ops: list[str]


class CatalogEventRead(BaseModel):
    """An event name and its known properties."""

    event: str
    properties: list[CatalogPropertyRead]


class CatalogRead(BaseModel):
    """The field catalogue."""

    fields: list[CatalogFieldRead]
    events: list[CatalogEventRead]


class PreviewCreate(BaseModel):
    """Body of a preview."""

    model_config = ConfigDict(extra="forbid")

    rule: dict[str, Any] = Field(description=RULE_DESCRIPTION)  # Any: rule document
    sample_size: int | None = Field(default=None, ge=0, le=100)


class SampleProfile(BaseModel):
    """A profile of a preview's sample."""

    profile_id: str
    traits: dict[str, Any]  # Any: JSON traits


class PreviewRead(BaseModel):
    """The audience of a rule now."""

    count: int
    sample: list[SampleProfile]
    seconds: float


class SegmentCreate(BaseModel):
    """Body of a saved segment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    rule: dict[str, Any] = Field(description=RULE_DESCRIPTION)  # Any: rule document
    refresh_minutes: int | None = Field(default=None, ge=1, le=525_600)


class SegmentUpdate(BaseModel):
    """Body of a segment change (only the fields given change)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    rule: dict[str, Any] | None = Field(default=None, description=RULE_DESCRIPTION)  # Any: rule
    refresh_minutes: int | None = Field(default=None, ge=1, le=525_600)


class SegmentRead(BaseModel):
    """A saved segment."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    description: str | None
    rule: dict[str, Any]  # Any: rule document
    version: int
    refresh_minutes: int | None
    created_at: datetime
    updated_at: datetime
    updated_by: str | None
    last_refreshed_at: datetime | None
    last_size: int | None


class SegmentVersionRead(BaseModel):
    """One saved version of a segment."""

    model_config = ConfigDict(from_attributes=True)

    version: int
    name: str
    rule: dict[str, Any]  # Any: rule document
    created_at: datetime
    created_by: str | None


class MemberRead(BaseModel):
    """A current member of a segment."""

    profile_id: str
    entered_at: datetime
    traits: dict[str, Any] | None  # Any: JSON traits


class SegmentRefreshRead(BaseModel):
    """One refresh of a segment: its size then and who entered and left."""

    refresh_id: int
    segment_version: int
    refreshed_at: Instant
    size: int
    entries: int
    exits: int
    mode: Literal["full", "incremental"] = Field(
        default="full", description="full, or incremental: only changed profiles re-evaluated"
    )
    evaluated: int | None = Field(default=None, description="profiles the rule was evaluated on")


class SegmentEventRead(BaseModel):
    """A published entry or exit."""

    seq: int
    segment_id: str
    profile_id: str
    kind: str
    occurred_at: Instant
    refresh_id: int
    segment_version: int
