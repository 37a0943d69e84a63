"""API models of the ingestion package: sources, mappings, stats and imports."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdp.identifiers import BUILTIN_KINDS, is_valid_kind

SourceKind = Literal["http", "file", "database"]
EventType = Literal["track", "identify"]

Name = Annotated[str, Field(min_length=1, max_length=200)]


class IdentifierSpec(BaseModel):
    """One identifier of a record: a column (or dotted path) or a composite of several."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(
        description="user_id, email, phone, anonymous_id, device_id, "
        "loyalty_card, a custom kind, or the name of a composite key"
    )
    column: str | None = Field(default=None, min_length=1, max_length=200)
    composite: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, min_length=2, max_length=8
    )

    @model_validator(mode="after")
    def _one_source(self) -> IdentifierSpec:
        if (self.column is None) == (self.composite is None):
            raise ValueError("an identifier has either `column` or `composite`")
        if not is_valid_kind(self.kind):
            raise ValueError(f"kind {self.kind!r} must be lower snake case")
        return self


class Mapping(BaseModel):
    """How a record becomes an event: identifiers, timestamp, name, traits and properties."""

    model_config = ConfigDict(extra="forbid")

    type: EventType = "track"
    event: str | None = Field(default=None, max_length=200, description="A fixed event name")
    event_column: str | None = Field(default=None, description="Column holding the event name")
    timestamp: str | None = Field(default=None, description="Column holding the event time")
    message_id: str | None = Field(
        default=None, description="Column with a unique id per record (default: a row hash)"
    )
    identifiers: list[IdentifierSpec] = Field(default_factory=list)
    custom_kinds: list[str] = Field(default_factory=list)
    traits: list[str] = Field(default_factory=list)
    properties: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _kinds_known(self) -> Mapping:
        for custom in self.custom_kinds:
            if not is_valid_kind(custom) or custom in BUILTIN_KINDS:
                raise ValueError(f"custom kind {custom!r} must be a new lower snake case name")
        known = BUILTIN_KINDS | set(self.custom_kinds)
        for spec in self.identifiers:
            if spec.composite is not None:
                if spec.kind in BUILTIN_KINDS:
                    raise ValueError(f"composite key {spec.kind!r} reuses a built-in kind")
            elif spec.kind not in known:
                raise ValueError(
                    f"unknown identifier kind {spec.kind!r}; declare it in custom_kinds"
                )
        if self.event is not None and self.event_column is not None:
            raise ValueError("give either `event` or `event_column`, not both")
        return self

    def columns(self) -> set[str]:
        """Every column the mapping reads."""
        used = {*self.traits, *self.properties}
        for name in (self.event_column, self.timestamp, self.message_id):
            if name:
                used.add(name)
        for spec in self.identifiers:
            used.update(spec.composite or [])
            if spec.column:
                used.add(spec.column)
        return used


class Schedule(BaseModel):
    """When a database source is pulled: every N seconds, or a cron expression (UTC)."""

    model_config = ConfigDict(extra="forbid")

    interval_seconds: int | None = Field(default=None, ge=60)
    cron: str | None = Field(default=None, max_length=100)

    @model_validator(mode="after")
    def _one(self) -> Schedule:
        if (self.interval_seconds is None) == (self.cron is None):
            raise ValueError("a schedule has either `interval_seconds` or `cron`")
        return self


class DatabaseConfig(BaseModel):
    """Where a database source reads: a SQLAlchemy URL and a table or a query."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1)
    table: str | None = Field(default=None, max_length=200)
    db_schema: str | None = Field(default=None, max_length=200, alias="schema")
    query: str | None = None
    cursor_column: str = Field(min_length=1, max_length=200)
    chunk_size: int = Field(default=50_000, ge=1, le=1_000_000)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _one(self) -> DatabaseConfig:
        if (self.table is None) == (self.query is None):
            raise ValueError("a database source has either `table` or `query`")
        return self


class EmptyConfig(BaseModel):
    """Configuration of `http` and `file` sources: nothing yet."""

    model_config = ConfigDict(extra="forbid")


class SourceCreate(BaseModel):
    """Body of a source creation."""

    name: Name
    kind: SourceKind
    config: dict[str, object] = Field(default_factory=dict)
    mapping: Mapping = Field(default_factory=Mapping)


class SourceUpdate(BaseModel):
    """Body of a source update: only the given fields change."""

    name: Name | None = None
    config: dict[str, object] | None = None
    mapping: Mapping | None = None
    enabled: bool | None = None


class SourceRead(BaseModel):
    """A source as listed (never its write key; database passwords masked)."""

    id: str
    name: str
    kind: SourceKind
    enabled: bool
    config: dict[str, object]
    mapping: Mapping
    write_key_prefix: str | None
    columns: list[str] | None
    cursor_value: str | None
    last_pull_at: datetime | None
    created_at: datetime
    updated_at: datetime


class SourceCreated(SourceRead):
    """A source just created or whose key was rotated: the only time its write key shows."""

    write_key: str | None


class RejectionRead(BaseModel):
    """One rejected message or row."""

    channel: str
    batch_id: int | None
    position: int | None
    message_id: str | None
    reason: str
    rejected_at: datetime


class SourceStats(BaseModel):
    """Counters of a source over all its loads."""

    received: int
    accepted: int
    rejected: int
    duplicates: int
    identifiers_dropped: int
    last_event_at: datetime | None
    recent_errors: list[RejectionRead]


class RowError(BaseModel):
    """A rejected row of an import, by its 1-based row number in the file."""

    row: int | None
    reason: str


class ImportRead(BaseModel):
    """An import record: one file (or one database pull) loaded into the warehouse."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    source_id: str
    channel: str
    name: str
    content_hash: str | None
    status: str
    rows_read: int
    rows_total: int | None = None
    # rows_read / rows_total while it runs (1.0 once finished), None if the total is unknown.
    progress: float | None = None
    accepted: int
    rejected: int
    duplicates: int
    identifiers_dropped: int
    skipped: bool
    started_at: datetime
    finished_at: datetime | None
    duration_ms: int | None
    error: str | None

    @model_validator(mode="after")
    def _progress(self) -> ImportRead:
        if self.status in ("succeeded", "skipped"):
            self.progress = 1.0
        elif self.rows_total:
            self.progress = round(min(self.rows_read / self.rows_total, 1.0), 4)
        return self


class ImportReport(ImportRead):
    """An import with the first rejected rows."""

    errors: list[RowError] = Field(default_factory=list)
