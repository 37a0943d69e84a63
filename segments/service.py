"""Use cases of the segments package: the only module other packages may import."""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cdp.config import SegmentsSettings
from cdp.db import Database, utcnow
from cdp.warehouse import Cursor, Query, Warehouse
from identity import service as identity_service
from segments import compiler, queries
from segments.errors import (
    AttributeConflict,
    AttributeNotFound,
    InvalidAttribute,
    InvalidRule,
    SegmentConflict,
    SegmentNotFound,
)
from segments.fields import (
    Catalog,
    FieldSource,
    build_catalog,
    field_sources_version,
    json_field_type,
    register_field_source,
    unregister_field_source,
)
from segments.models import SegmentsAttribute, SegmentsSegment, SegmentsSegmentVersion
from segments.rules import (
    ATTRIBUTE_NAME,
    AttributeDefinition,
    FieldType,
    Rule,
    builtin_attributes,
    dump_rule,
    is_list_path,
    json_path,
    parse_rule,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FieldSource",
    "Reads",
    "attribute_definitions",
    "attribute_values",
    "memberships_among",
    "parse_rule",
    "profile_attributes",
    "refresh_attributes",
    "refresh_derived",
    "refresh_event_map",
    "refresh_property_values",
    "refresh_segment",
    "register_field_source",
    "register_reader",
    "segment_events_since",
    "unregister_field_source",
    "unregister_reader",
]

STATE_ATTRIBUTES = "attributes_watermark"
STATE_CATALOG = "catalog_refreshed"
STATE_COLUMNS = "attribute_columns"
STATE_EVENT_MAP = "event_profiles_watermark"
STATE_EVENT_CATALOG = "event_catalog_mark"
STATE_ATTR_PROFILES = "attributes_profiles_mark"
STATE_ATTR_DIGEST = "attributes_digest"
STATE_PROPERTY_VALUES = "property_values_mark"
STATE_PROPERTY_ERASURES = "property_values_erasures"
# Moves whenever a path is added to the stored values (a cache key of the compiler's fields).
STATE_PROPERTY_PATHS = "property_values_paths"
# Numbers every rebuild of the catalogue or the attribute columns in this process.
_GENERATION = itertools.count(1)
_PARAM = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
# One writer process; refreshes of membership are serialised so seq numbers never collide.
_REFRESH_LOCK = threading.Lock()

_DUCK_TYPES: dict[str, FieldType] = {
    "BIGINT": "integer",
    "INTEGER": "integer",
    "DOUBLE": "number",
    "TIMESTAMP": "timestamp",
    "VARCHAR": "string",
    "BOOLEAN": "boolean",
}


def _now() -> datetime:
    """Naive UTC now: warehouse timestamps are naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def _run_script(cur: Cursor, query: Query) -> None:
    """Run `;`-separated statements one by one (DuckDB binds parameters to one statement)."""
    for statement in query.sql.split(";\n"):
        if not statement.strip():
            continue
        names = set(_PARAM.findall(statement))
        params = {k: v for k, v in query.params.items() if k in names}
        cur.execute(statement, params or None)


def _one(cur: Cursor, query: Query) -> tuple[Any, ...]:  # Any: SQL values
    """The first row of a query that returns one (the result is fetched to its end)."""
    rows = cur.execute(query.sql, query.params or None).fetchall()
    return tuple(rows[0])


@dataclass(frozen=True, slots=True)
class Reads:
    """What one user outside this package (a loyalty rule, say) reads of it: saved segments
    by id and computed attributes by name."""

    segments: frozenset[str] = frozenset()
    attributes: frozenset[str] = frozenset()


# A package's users of segments and attributes: their names (as a user would recognise
# them) and what each reads. Registered by the package (`register_reader`), so a segment or
# an attribute it reads is not deleted from under it; this package imports none of them.
Readers = Callable[[Session], Mapping[str, Reads]]
_READERS: dict[str, Readers] = {}


def register_reader(kind: str, readers: Readers) -> None:
    """Add (or replace) a package's readers of segments and attributes, e.g.
    `("loyalty_rules", ...)`: deleting what they read is refused with their names."""
    _READERS[kind] = readers


def unregister_reader(kind: str) -> None:
    """Remove a package's readers."""
    _READERS.pop(kind, None)


def _outside_users(
    session: Session, *, segment_id: str | None = None, attribute: str | None = None
) -> dict[str, list[str]]:
    """By kind of reader, the names of the readers outside this package that read a segment
    or an attribute."""
    found: dict[str, list[str]] = {}
    for kind, readers in sorted(_READERS.items()):
        names = sorted(
            name
            for name, reads in readers(session).items()
            if (segment_id is not None and segment_id in reads.segments)
            or (attribute is not None and attribute in reads.attributes)
        )
        if names:
            found[kind] = names
    return found


def _users_message(what: str, users: dict[str, list[str]]) -> str:
    """`<what> is used by segments: a, b; loyalty_rules: c`."""
    parts = [f"{kind}: {', '.join(names)}" for kind, names in users.items()]
    return f"{what} is used by {'; '.join(parts)}"


# Computed attributes.


@dataclass(frozen=True, slots=True)
class AttributeInfo:
    """An attribute as the API shows it."""

    name: str
    description: str | None
    builtin: bool
    definition: AttributeDefinition
    created_at: datetime | None = None
    updated_at: datetime | None = None
    updated_by: str | None = None

    @property
    def type(self) -> FieldType:
        """The type of its values."""
        return self.definition.value_type


_BUILTIN_DESCRIPTIONS = {
    "first_purchase_at": "Time of the first purchase (not fully refunded)",
    "last_purchase_at": "Time of the last purchase (not fully refunded)",
    "last_visit_at": "Time of the last page, screen or purchase event",
    "orders_count": "Purchases, fully refunded orders excluded",
    "orders_365d": "Purchases in the last 365 days",
    "visits_365d": "Days with a visit in the last 365 days",
    "spend_total": "Purchase amounts net of refunds",
    "spend_365d": "Purchase amounts net of refunds, last 365 days",
    "avg_basket": "Average net purchase amount",
    "customer_since": "Time of the profile's first event (seniority)",
    "days_since_last_purchase": "Calendar days since the last purchase",
}


def list_attributes(session: Session, *, settings: SegmentsSettings) -> list[AttributeInfo]:
    """The built-in attributes, then the defined ones by name."""
    infos = [
        AttributeInfo(name, _BUILTIN_DESCRIPTIONS.get(name), True, definition)
        for name, definition in builtin_attributes(settings).items()
    ]
    for row in session.scalars(select(SegmentsAttribute).order_by(SegmentsAttribute.name)):
        infos.append(_info(row))
    return infos


def _info(row: SegmentsAttribute) -> AttributeInfo:
    return AttributeInfo(
        row.name,
        row.description,
        False,
        AttributeDefinition.model_validate(row.definition),
        row.created_at,
        row.updated_at,
        row.updated_by,
    )


def get_attribute(session: Session, *, name: str, settings: SegmentsSettings) -> AttributeInfo:
    """One attribute by name, built in or defined; AttributeNotFound otherwise."""
    for info in list_attributes(session, settings=settings):
        if info.name == name:
            return info
    raise AttributeNotFound(f"no attribute named {name!r}")


def _defined(session: Session, name: str) -> SegmentsAttribute:
    row = session.scalar(select(SegmentsAttribute).where(SegmentsAttribute.name == name))
    if row is None:
        raise AttributeNotFound(f"no attribute named {name!r}")
    return row


def create_attribute(
    session: Session,
    *,
    name: str,
    description: str | None,
    definition: AttributeDefinition,
    settings: SegmentsSettings,
    actor: str | None,
) -> AttributeInfo:
    """Define a new attribute; it gets values at the next refresh."""
    if not ATTRIBUTE_NAME.match(name):
        raise InvalidAttribute(
            "name: use lower-case letters, digits and underscores, starting with a letter"
        )
    if name in builtin_attributes(settings):
        raise AttributeConflict(f"{name} is a built-in attribute")
    if session.scalar(select(SegmentsAttribute).where(SegmentsAttribute.name == name)):
        raise AttributeConflict(f"an attribute named {name!r} exists")
    now = utcnow()
    row = SegmentsAttribute(
        name=name,
        description=description,
        definition=definition.model_dump(mode="json", exclude_defaults=True),
        created_at=now,
        updated_at=now,
        updated_by=actor,
    )
    session.add(row)
    session.flush()
    logger.info("attribute defined", extra={"attribute": name})
    return _info(row)


def update_attribute(
    session: Session,
    *,
    name: str,
    description: str | None,
    definition: AttributeDefinition,
    settings: SegmentsSettings,
    actor: str | None,
) -> AttributeInfo:
    """Replace a defined attribute's definition; built-ins are changed through settings."""
    if name in builtin_attributes(settings):
        raise AttributeConflict(f"{name} is built in: change it through the settings")
    row = _defined(session, name)
    row.description = description
    row.definition = definition.model_dump(mode="json", exclude_defaults=True)
    row.updated_at = utcnow()
    row.updated_by = actor
    return _info(row)


def delete_attribute(session: Session, *, name: str, settings: SegmentsSettings) -> None:
    """Remove a defined attribute, unless a saved segment compares it."""
    if name in builtin_attributes(settings):
        raise AttributeConflict(f"{name} is built in and cannot be deleted")
    row = _defined(session, name)
    segments = sorted(
        s.name
        for s in session.scalars(select(SegmentsSegment))
        if name in compiler.attribute_fields(parse_rule(s.rule))
    )
    users = ({"segments": segments} if segments else {}) | _outside_users(session, attribute=name)
    if users:
        raise AttributeConflict(_users_message(f"attribute {name}", users), details=users)
    session.delete(row)


def attribute_definitions(
    session: Session, *, settings: SegmentsSettings
) -> dict[str, AttributeDefinition]:
    """Every attribute to compute, built-ins first."""
    return {i.name: i.definition for i in list_attributes(session, settings=settings)}


def compile_attributes(
    session: Session, *, settings: SegmentsSettings, now: datetime | None = None
) -> Query:
    """The one statement computing every attribute (exposed for inspection and benchmarks)."""
    return compiler.compile_attributes(
        attribute_definitions(session, settings=settings),
        settings=settings,
        event_profiles_sql=identity_service.event_profile_sql(),
        now=now or _now(),
    )


@dataclass(frozen=True, slots=True)
class AttributeRefresh:
    """What an attribute refresh did."""

    profiles: int
    attributes: int
    computed_at: datetime
    seconds: float
    skipped: bool = False


def refresh_attributes(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: SegmentsSettings,
    now: datetime | None = None,
) -> AttributeRefresh:
    """Recompute every attribute of every profile into `profile_attributes` (one statement)."""
    started = time.perf_counter()
    at = now or _now()
    definitions = attribute_definitions(session, settings=settings)
    query = compiler.compile_attributes(
        definitions,
        settings=settings,
        event_profiles_sql=identity_service.event_profile_sql(),
        now=at,
    )
    with warehouse.transaction() as cur:
        watermark = str(_one(cur, queries.PROFILES_WATERMARK)[0])
        profiles_mark = _one(cur, queries.PROFILES_MARK)[0]
        cur.execute("CREATE OR REPLACE TABLE profile_attributes AS " + query.sql, query.params)
        row = _one(cur, Query("SELECT count(*) FROM profile_attributes"))
        for state in (
            queries.write_state(STATE_ATTRIBUTES, _attr_mark(watermark, definitions, at), at),
            queries.write_state(STATE_COLUMNS, f"rebuilt {next(_GENERATION)}", at),
            # For incremental segment refresh: the attributes reflect every profile change
            # before this mark, under these definitions and settings.
            queries.write_state(
                STATE_ATTR_PROFILES,
                "" if profiles_mark is None else profiles_mark.isoformat(),
                at,
            ),
            queries.write_state(STATE_ATTR_DIGEST, _attr_digest(definitions, settings), at),
        ):
            cur.execute(state.sql, state.params)
    profiles = int(row[0])
    seconds = time.perf_counter() - started
    logger.info(
        "attributes refreshed",
        extra={"profiles": profiles, "attributes": len(definitions), "seconds": seconds},
    )
    return AttributeRefresh(profiles, len(definitions), at, seconds)


def _attr_digest(definitions: dict[str, AttributeDefinition], settings: SegmentsSettings) -> str:
    """Changes whenever a definition or the purchase/visit settings change."""
    text = "|".join(f"{k}={v.model_dump_json()}" for k, v in definitions.items())
    text += "|" + settings.purchase.model_dump_json() + settings.visit.model_dump_json()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _clock_dependent(definition: AttributeDefinition | None) -> bool:
    """Whether an attribute's values move with the refresh time (windows, days since)."""
    return definition is None or (
        definition.window_days is not None
        or definition.aggregation in ("days_since_first", "days_since_last")
    )


def _attr_mark(watermark: str, definitions: dict[str, AttributeDefinition], at: datetime) -> str:
    # Relative windows move with the day, so a new day is a change too.
    fingerprint = "|".join(f"{k}={v.model_dump_json()}" for k, v in definitions.items())
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return f"{watermark}#{at.date().isoformat()}#{digest}"


def refresh_attributes_if_stale(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: SegmentsSettings,
    now: datetime | None = None,
) -> AttributeRefresh:
    """Refresh unless profiles, definitions and the day are what the last refresh saw."""
    at = now or _now()
    definitions = attribute_definitions(session, settings=settings)
    watermark = str(warehouse.scalar(queries.PROFILES_WATERMARK))
    rows = warehouse.rows(queries.read_state(STATE_ATTRIBUTES))
    if rows and rows[0][0] == _attr_mark(watermark, definitions, at):
        return AttributeRefresh(0, len(definitions), rows[0][1], 0.0, skipped=True)
    return refresh_attributes(session, warehouse, settings=settings, now=at)


def profile_attributes(warehouse: Warehouse, *, profile_id: str) -> dict[str, Any] | None:
    """The computed attributes of one profile (with `computed_at`), or None if not computed.

    Any: attribute values are numbers, strings or timestamps depending on the definition.
    """
    frame = warehouse.run(queries.profile_attributes(profile_id))
    if frame.is_empty():
        return None
    row: dict[str, Any] = frame.drop("profile_id").row(0, named=True)  # Any: see above
    return row


def attribute_values(
    warehouse: Warehouse, *, profile_ids: list[str], names: Sequence[str]
) -> pl.DataFrame:
    """The computed attributes `names` of these profiles as of the last refresh, set-based:
    `profile_id` and one column per name that the last refresh computed (a name never
    computed, or unknown, has no column); profiles without values have no row."""
    columns = {str(n) for n, _ in warehouse.rows(queries.ATTRIBUTE_COLUMNS)}
    wanted = sorted(set(names) & columns)
    if not profile_ids or not wanted:
        return pl.DataFrame(schema={"profile_id": pl.String()})
    return warehouse.run(queries.attribute_values(profile_ids, wanted))


def memberships_among(
    warehouse: Warehouse, *, segment_ids: Sequence[str], profile_ids: list[str]
) -> pl.DataFrame:
    """Which of these profiles are current members (as of each segment's last refresh) of
    these saved segments: rows `(segment_id, profile_id)`, read set-based."""
    if not segment_ids or not profile_ids:
        return pl.DataFrame(schema={"segment_id": pl.String(), "profile_id": pl.String()})
    return warehouse.run(queries.memberships_among(sorted(segment_ids), profile_ids))


def refresh_event_map(warehouse: Warehouse, *, now: datetime | None = None) -> int:
    """Store identity's current event -> profile relation for segment event conditions.

    Compiled rules read this table instead of the live relation while the profiles watermark
    is the one recorded here (identity has not run since); returns the number of events
    with a name (event conditions need one).
    """
    at = now or _now()
    with warehouse.transaction() as cur:
        watermark = str(_one(cur, queries.PROFILES_WATERMARK)[0])
        relation = compiler.event_map_relation(identity_service.event_profile_sql())
        cur.execute(queries.materialise_event_profiles(relation).sql)
        row = _one(cur, Query("SELECT count(*) FROM segment_event_profiles"))
        state = queries.write_state(STATE_EVENT_MAP, watermark, at)
        cur.execute(state.sql, state.params)
    return int(row[0])


def refresh_property_values(
    warehouse: Warehouse, *, settings: SegmentsSettings, now: datetime | None = None
) -> int:
    """Materialise the values of the purchase and refund events' field paths (from the event
    catalogue) for the events received since the last run; returns the rows added.

    Each (event, path) keeps its own mark (`segment_property_paths.upto`): a path new to the
    catalogue is materialised over every event, the others over the events after their mark.
    One transaction: the rows and the marks move together. Event conditions read the rows up
    to the mark and the JSON of the events after it, so their result never depends on when
    this last ran. An event that stops being the purchase or refund event (the settings
    changed) keeps its rows and marks: a rule compiled before still reads what it expects, and
    its later events are read from their JSON. Rows of erased events are dropped when an
    erasure was published since the last run (they could not match anyway).
    """
    at = now or _now()
    wanted_events = list(dict.fromkeys((settings.purchase.event, settings.purchase.refund_event)))
    added = 0
    new_paths = False
    with warehouse.transaction() as cur:
        state = {str(n): str(t) for n, t, _ in cur.execute(queries.ALL_STATE.sql).fetchall()}
        after = int(state.get(STATE_PROPERTY_VALUES) or 0)
        upto = max(int(_one(cur, queries.MAX_EVENT_ID)[0]), after)
        have: dict[str, dict[str, int]] = {}
        for event, path, mark in cur.execute(queries.PROPERTY_PATHS.sql).fetchall():
            have.setdefault(str(event), {})[str(path)] = int(mark)
        typed = _event_fields(cur.execute(queries.EVENT_CATALOG.sql).fetchall())
        for event in wanted_events:
            known = have.get(event, {})
            for p in sorted(set(typed.get(event, {})) | set(known)):
                start = known.get(p, 0)
                if upto > start:
                    q = queries.append_property_values(
                        event, p, json_path(p), is_list=is_list_path(p), after=start, upto=upto
                    )
                    added += int(_one(cur, q)[0])
                if upto > start or p not in known:
                    q = queries.set_property_path(event, p, upto)
                    cur.execute(q.sql, q.params)
                    new_paths = new_paths or p not in known
        erasures = str(_one(cur, queries.ERASURES_MARK)[0])
        if erasures != state.get(STATE_PROPERTY_ERASURES, "0"):
            cur.execute(queries.PRUNE_PROPERTY_VALUES.sql)
        marks = [(STATE_PROPERTY_VALUES, str(upto)), (STATE_PROPERTY_ERASURES, erasures)]
        if new_paths:
            marks.append((STATE_PROPERTY_PATHS, f"rebuilt {next(_GENERATION)}"))
        for name, text in marks:
            write = queries.write_state(name, text, at)
            cur.execute(write.sql, write.params)
    return added


# The field catalogue.


# Deepest nesting of JSON paths the catalogue descends to.
MAX_NESTING = 8
_STAT_COLUMNS = ("numbers", "booleans", "strings", "timestamps", "objects", "arrays")


def _path_stats(cur: Cursor, docs_sql: str, params: dict[str, object]) -> pl.DataFrame:
    """Value counts by JSON type of every path of the documents (grp, path, n, counts...).

    One set-based query per level, plus one per path holding objects or lists (few).
    """
    query = queries.top_level_stats(docs_sql, params)
    level: pl.DataFrame = cur.sql(query.sql, params=query.params or None).pl()
    frames: list[pl.DataFrame] = []
    for _ in range(MAX_NESTING):
        if level.is_empty():
            break
        frames.append(level)
        containers = level.filter((pl.col("objects") > 0) | (pl.col("arrays") > 0))
        children: list[pl.DataFrame] = []
        for group, path in containers.select("grp", "path").iter_rows():
            query = queries.nested_stats(docs_sql, params, group=group, path=path)
            children.append(cur.sql(query.sql, params=query.params).pl())
        level = pl.concat(children) if children else level.clear()
    if not frames:
        return level
    return pl.concat(frames).with_columns(pl.col(c).cast(pl.Int64) for c in ("n", *_STAT_COLUMNS))


def _event_stats(cur: Cursor, after: int, upto: int) -> pl.DataFrame | None:
    """Catalogue rows of the events in `(after, upto]`: one per event name (path ''), one per
    event and property path; None if no event there has a name."""
    window: dict[str, object] = {"after": after, "upto": upto}
    names = cur.sql(queries.event_counts(after, upto).sql, params=window).pl()
    names = names.with_columns(
        pl.lit("").alias("path"), *(pl.lit(0, pl.Int64).alias(c) for c in _STAT_COLUMNS)
    )
    stats = _path_stats(cur, queries.EVENT_DOCS, window)
    columns = ["grp", "path", "n", *_STAT_COLUMNS]
    parts = [
        part.select(columns).with_columns(pl.col(c).cast(pl.Int64) for c in ("n", *_STAT_COLUMNS))
        for part in (names, stats)
        if not part.is_empty()
    ]
    return pl.concat(parts) if parts else None


def refresh_catalog(
    warehouse: Warehouse, *, now: datetime | None = None, full: bool = False
) -> None:
    """Re-derive the trait catalogue from profiles and add the events since the last run to
    the event catalogue (`full`: rebuild it from every event)."""
    at = now or _now()
    with warehouse.transaction() as cur:
        traits = _path_stats(cur, queries.TRAIT_DOCS, {}).select(
            "path", pl.col("n").alias("profiles"), *_STAT_COLUMNS
        )
        cur.execute(queries.CLEAR_TRAIT_CATALOG.sql)
        cur.register("seg_trait_frame", traits)
        cur.execute("INSERT INTO segment_trait_catalog SELECT * FROM seg_trait_frame")
        cur.unregister("seg_trait_frame")
        state = dict((str(n), t) for n, t, _ in cur.execute(queries.ALL_STATE.sql).fetchall())
        after = 0 if full else int(state.get(STATE_EVENT_CATALOG) or 0)
        if full:
            cur.execute(queries.CLEAR_EVENT_CATALOG.sql)
        upto = int(_one(cur, queries.MAX_EVENT_ID)[0])
        frame = _event_stats(cur, after, upto) if upto > after else None
        if frame is not None:
            cur.register("seg_event_frame", frame)
            cur.execute("CREATE OR REPLACE TEMP TABLE seg_cat_new AS SELECT * FROM seg_event_frame")
            cur.unregister("seg_event_frame")
            _run_script(cur, queries.MERGE_EVENT_CATALOG)
        for name, text in (
            (STATE_EVENT_CATALOG, str(max(upto, after))),
            (STATE_CATALOG, f"rebuilt {next(_GENERATION)}"),
        ):
            write = queries.write_state(name, text, at)
            cur.execute(write.sql, write.params)


def refresh_derived(
    session: Session,
    warehouse: Warehouse,
    *,
    settings: SegmentsSettings,
    only_if_stale: bool = False,
    now: datetime | None = None,
) -> AttributeRefresh:
    """Everything segments derive from profiles and events, in order: the attributes, the
    event -> profile map, the field catalogue and the stored order property values.

    `only_if_stale` (the scheduled job): do nothing when profiles, definitions and the day
    are what the last refresh saw. The API, the demo and the on-demand job refresh anyway.
    `now` is the attributes' clock (relative windows); the marks take the real time.
    """
    if only_if_stale:
        result = refresh_attributes_if_stale(session, warehouse, settings=settings, now=now)
        if result.skipped:
            return result
    else:
        result = refresh_attributes(session, warehouse, settings=settings, now=now)
    refresh_event_map(warehouse)
    refresh_catalog(warehouse)
    refresh_property_values(warehouse, settings=settings)
    return result


@dataclass(frozen=True, slots=True)
class _WarehouseFields:
    traits: dict[str, FieldType]
    events: dict[str, dict[str, FieldType]]
    attributes: dict[str, FieldType]
    marks: dict[str, str]
    values: compiler.PropertyValues | None = None
    # The profiles watermark when these fields were asked for (not part of the cache key).
    watermark: str = ""


# The warehouse part of the catalogue, per warehouse, keyed by the package's marks: they move
# whenever the catalogue tables or the attribute columns are rebuilt, so a preview reads one
# small table instead of four.
_FIELDS_CACHE: weakref.WeakKeyDictionary[Warehouse, tuple[object, _WarehouseFields]] = (
    weakref.WeakKeyDictionary()
)


def _fields_marks(
    warehouse: Warehouse, marks: tuple[tuple[Any, ...], ...]
) -> tuple[tuple[Any, ...], ...]:  # Any: SQL values
    if not any(name == STATE_CATALOG for name, _, _ in marks):
        refresh_catalog(warehouse)
        return tuple(warehouse.rows(queries.ALL_STATE))
    return marks


def _event_fields(
    rows: Sequence[tuple[Any, ...]],  # Any: SQL values of EVENT_CATALOG
) -> dict[str, dict[str, FieldType]]:
    """Each catalogued event's typed property paths (an event with none maps to {})."""
    events: dict[str, dict[str, FieldType]] = {}
    for event, path, _, *counts in rows:
        props = events.setdefault(str(event), {})
        ftype = json_field_type(**dict(zip(_STAT_COLUMNS, map(int, counts), strict=True)))
        if path and ftype is not None:
            props[str(path)] = ftype
    return events


# The last marks read per warehouse, with the warehouse's write counter read just before:
# while the counter has not moved, nothing was written since and the marks are the same.
_MARKS_CACHE: weakref.WeakKeyDictionary[Warehouse, tuple[int, list[tuple[Any, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def _marks_and_watermark(warehouse: Warehouse) -> list[tuple[Any, ...]]:  # Any: SQL values
    """STATE_AND_WATERMARK's rows: read again only when the warehouse was written since."""
    writes = warehouse.writes
    cached = _MARKS_CACHE.get(warehouse)
    if cached is not None and cached[0] == writes:
        return cached[1]
    rows = warehouse.rows(queries.STATE_AND_WATERMARK)
    _MARKS_CACHE[warehouse] = (writes, rows)
    return rows


def _warehouse_fields(warehouse: Warehouse) -> _WarehouseFields:
    """The warehouse part of the catalogue, with the profiles watermark as of now (one small
    query, none while nothing was written to the warehouse since the last one)."""
    rows = _marks_and_watermark(warehouse)
    watermark = next(str(text) for name, text, _ in rows if name is None)
    marks = tuple(sorted((r for r in rows if r[0] is not None), key=lambda r: str(r[0])))
    cached = _FIELDS_CACHE.get(warehouse)
    if cached is not None and cached[0] == marks:
        return replace(cached[1], watermark=watermark)
    marks = _fields_marks(warehouse, marks)
    traits: dict[str, FieldType] = {}
    for path, _, *counts in warehouse.rows(queries.TRAIT_CATALOG):
        ftype = json_field_type(**dict(zip(_STAT_COLUMNS, map(int, counts), strict=True)))
        if ftype is not None:
            traits[str(path)] = ftype
    events = _event_fields(warehouse.rows(queries.EVENT_CATALOG))
    attributes = {
        str(name): _DUCK_TYPES[str(dtype)]
        for name, dtype in warehouse.rows(queries.ATTRIBUTE_COLUMNS)
        if str(dtype) in _DUCK_TYPES
    }
    texts = {str(n): str(t) for n, t, _ in marks}
    values = None
    if STATE_PROPERTY_VALUES in texts:
        values = compiler.PropertyValues(
            {(str(e), str(p)): int(m) for e, p, m in warehouse.rows(queries.PROPERTY_PATHS)}
        )
    fields = _WarehouseFields(traits, events, attributes, texts, values)
    _FIELDS_CACHE[warehouse] = (marks, fields)
    return replace(fields, watermark=str(warehouse.scalar(queries.PROFILES_WATERMARK)))


def catalog(session: Session, warehouse: Warehouse, *, settings: SegmentsSettings) -> Catalog:
    """Every field, event and property rules may use (built on first use if never built), with
    the attributes' descriptions (compiles use `_compile_catalog`, which has none)."""
    fields = _warehouse_fields(warehouse)
    return build_catalog(
        traits=fields.traits,
        attributes=fields.attributes,
        events=fields.events,
        attribute_descriptions={
            i.name: i.description or "" for i in list_attributes(session, settings=settings)
        },
    )


# The last catalogue built for compiling (no descriptions), with what it was built from: the
# warehouse fields' dicts (the same objects while the package's marks have not moved) and the
# registered field sources' version. Rebuilding it was most of a compile's own cost between
# two writes (about 0.5 ms of 0.8 ms at 1M profiles).
_COMPILE_CATALOG: list[tuple[object, object, object, int, Catalog]] = []


def _compile_catalog(fields: _WarehouseFields) -> Catalog:
    """The catalogue compiles use: built again only when the fields or the sources changed."""
    version = field_sources_version()
    for traits, attributes, events, seen, built in _COMPILE_CATALOG:
        if (
            traits is fields.traits
            and attributes is fields.attributes
            and events is fields.events
            and seen == version
        ):
            return built
    built = build_catalog(traits=fields.traits, attributes=fields.attributes, events=fields.events)
    _COMPILE_CATALOG[:] = [(fields.traits, fields.attributes, fields.events, version, built)]
    return built


# Segments.


def _segment(session: Session, segment_id: str) -> SegmentsSegment:
    row = session.get(SegmentsSegment, segment_id)
    if row is None:
        raise SegmentNotFound(f"segment {segment_id} does not exist")
    return row


def _resolver(session: Session) -> compiler.SegmentResolver:
    def resolve(segment_id: str) -> Rule | None:
        row = session.get(SegmentsSegment, segment_id)
        return None if row is None else parse_rule(row.rule)

    return resolve


def _event_profiles(fields: _WarehouseFields) -> str:
    """The event -> profile relation for event conditions: the map materialised by the last
    attribute refresh while profiles have not changed since, identity's live relation else."""
    mark = fields.marks.get(STATE_EVENT_MAP)
    if mark is not None and mark == fields.watermark:
        return queries.EVENT_PROFILES_TABLE
    return compiler.event_map_relation(identity_service.event_profile_sql())


def _attributes_current(fields: _WarehouseFields) -> bool:
    """Whether `profile_attributes` was refreshed since identity last changed profiles (then
    it has one row per live profile)."""
    mark = fields.marks.get(STATE_ATTRIBUTES)
    if mark is None:
        return False
    return mark.split("#", 1)[0] == fields.watermark


def compile_segment_rule(
    session: Session,
    warehouse: Warehouse,
    *,
    rule: Rule,
    settings: SegmentsSettings,
    segment_id: str | None = None,
    now: datetime | None = None,
) -> Query:
    """The one statement selecting the profiles of a rule; InvalidRule names the bad path."""
    fields = _warehouse_fields(warehouse)
    return compiler.compile_rule_parts(
        rule,
        catalog=_compile_catalog(fields),
        now=now or _now(),
        event_profiles_sql=lambda: _event_profiles(fields),
        resolve_segment=_resolver(session),
        segment_id=segment_id,
        attributes_current=lambda: _attributes_current(fields),
        property_values=fields.values,
    ).query


@dataclass(frozen=True, slots=True)
class Preview:
    """The size of a rule's audience now and a sample of it."""

    count: int
    sample: list[dict[str, Any]]  # Any: profile_id and traits (JSON)
    seconds: float


def preview(
    session: Session,
    warehouse: Warehouse,
    *,
    rule: Any,  # Any: the rule document as sent
    settings: SegmentsSettings,
    sample_size: int | None = None,
    now: datetime | None = None,
) -> Preview:
    """Evaluate a rule without saving it: count and a sample of the matching profiles."""
    started = time.perf_counter()
    query = compile_segment_rule(
        session, warehouse, rule=parse_rule(rule), settings=settings, now=now
    )
    size = settings.preview_sample_size if sample_size is None else sample_size
    with warehouse.cursor() as cur:
        cur.execute("CREATE OR REPLACE TEMP TABLE seg_preview AS " + query.sql, query.params)
        try:
            row = _one(cur, Query("SELECT count(*) FROM seg_preview"))
            sample_q = queries.sample_profiles(size)
            frame = cur.sql(sample_q.sql, params=sample_q.params).pl()
        finally:
            cur.execute("DROP TABLE IF EXISTS seg_preview")
    sample = [{"profile_id": pid, "traits": _json(traits)} for pid, traits in frame.iter_rows()]
    return Preview(int(row[0]), sample, time.perf_counter() - started)


def _json(text: Any) -> Any:  # Any: JSON text from DuckDB, parsed
    return orjson.loads(text) if isinstance(text, str) else text


def list_segments(
    session: Session, *, limit: int, offset: int
) -> tuple[list[SegmentsSegment], int]:
    """Saved segments by name."""
    total = session.scalar(select(func.count()).select_from(SegmentsSegment)) or 0
    rows = session.scalars(
        select(SegmentsSegment).order_by(SegmentsSegment.name).limit(limit).offset(offset)
    )
    return list(rows), total


def get_segment(session: Session, *, segment_id: str) -> SegmentsSegment:
    """One saved segment; SegmentNotFound otherwise."""
    return _segment(session, segment_id)


def _check_name(session: Session, name: str, segment_id: str | None) -> None:
    other = session.scalar(select(SegmentsSegment).where(SegmentsSegment.name == name))
    if other is not None and other.id != segment_id:
        raise SegmentConflict(f"a segment named {name!r} exists")


def create_segment(
    session: Session,
    warehouse: Warehouse,
    *,
    name: str,
    description: str | None,
    rule: Any,  # Any: the rule document as sent
    refresh_minutes: int | None,
    settings: SegmentsSettings,
    actor: str | None,
) -> SegmentsSegment:
    """Save a segment (version 1) after compiling its rule; members come with its first refresh."""
    parsed = parse_rule(rule)
    _check_name(session, name, None)
    row = SegmentsSegment(
        name=name,
        description=description,
        rule=dump_rule(parsed),
        version=1,
        refresh_minutes=refresh_minutes,
        created_at=utcnow(),
        updated_at=utcnow(),
        updated_by=actor,
    )
    session.add(row)
    session.flush()
    compile_segment_rule(session, warehouse, rule=parsed, settings=settings, segment_id=row.id)
    session.add(_version(row, actor))
    return row


def _version(row: SegmentsSegment, actor: str | None) -> SegmentsSegmentVersion:
    return SegmentsSegmentVersion(
        segment_id=row.id,
        version=row.version,
        name=row.name,
        rule=row.rule,
        created_at=utcnow(),
        created_by=actor,
    )


def update_segment(
    session: Session,
    warehouse: Warehouse,
    *,
    segment_id: str,
    changes: dict[str, Any],  # Any: the fields given in the request
    settings: SegmentsSettings,
    actor: str | None,
) -> SegmentsSegment:
    """Change a segment; a new name or rule makes a new version (cycles are rejected)."""
    row = _segment(session, segment_id)
    versioned = False
    if "name" in changes and changes["name"] != row.name:
        _check_name(session, changes["name"], row.id)
        row.name = changes["name"]
        versioned = True
    if "rule" in changes:
        parsed = parse_rule(changes["rule"])
        compile_segment_rule(session, warehouse, rule=parsed, settings=settings, segment_id=row.id)
        document = dump_rule(parsed)
        if document != row.rule:
            row.rule = document
            versioned = True
    if "description" in changes:
        row.description = changes["description"]
    if "refresh_minutes" in changes:
        row.refresh_minutes = changes["refresh_minutes"]
    row.updated_at = utcnow()
    row.updated_by = actor
    if versioned:
        row.version += 1
        session.add(_version(row, actor))
    return row


def delete_segment(session: Session, warehouse: Warehouse, *, segment_id: str) -> None:
    """Delete a segment nothing refers to (no other segment, no registered reader such as a
    loyalty rule); its history stays in the warehouse."""
    row = _segment(session, segment_id)
    segments = sorted(
        s.name
        for s in session.scalars(select(SegmentsSegment).where(SegmentsSegment.id != segment_id))
        if segment_id in compiler.dependencies(parse_rule(s.rule))
    )
    users = ({"segments": segments} if segments else {}) | _outside_users(
        session, segment_id=segment_id
    )
    if users:
        raise SegmentConflict(_users_message(f"segment {row.name}", users), details=users)
    session.execute(
        delete(SegmentsSegmentVersion).where(SegmentsSegmentVersion.segment_id == segment_id)
    )
    session.delete(row)
    warehouse.execute(queries.forget_segment(segment_id))


def segment_versions(session: Session, *, segment_id: str) -> list[SegmentsSegmentVersion]:
    """Every saved version of a segment, newest first."""
    _segment(session, segment_id)
    return list(
        session.scalars(
            select(SegmentsSegmentVersion)
            .where(SegmentsSegmentVersion.segment_id == segment_id)
            .order_by(SegmentsSegmentVersion.version.desc())
        )
    )


RefreshMode = Literal["full", "incremental"]


@dataclass(frozen=True, slots=True)
class SegmentRefresh:
    """What one refresh of a segment's membership did."""

    segment_id: str
    refresh_id: int
    version: int
    refreshed_at: datetime
    size: int
    entries: int
    exits: int
    mode: RefreshMode = "full"
    evaluated: int = 0


def _since(
    compiled: compiler.CompiledRule,
    previous: tuple[Any, ...] | None,  # Any: SQL values of segment_refresh_marks
    attributes: tuple[datetime | None, str | None],
    volatile_attributes: bool,
) -> datetime | None:
    """The profiles mark from which an incremental refresh re-evaluates, None for a full one.

    Incremental when the rule is per profile (no clock, segment or registered relation), uses
    no clock-dependent attribute, and its compiled condition and the attribute definitions are
    those of the last refresh. Profiles identity rewrote since the last refresh's profiles
    mark are re-evaluated; with attributes, also those rewritten since the mark the attributes
    of the last refresh were computed at (their attributes may have changed since).
    """
    if not compiled.per_profile or volatile_attributes or previous is None:
        return None
    fingerprint, profiles_mark, attributes_mark, attributes_digest = previous
    if fingerprint != compiled.fingerprint or profiles_mark is None:
        return None
    since: datetime = profiles_mark
    if compiled.attributes:
        if attributes_digest != attributes[1] or attributes_mark is None:
            return None
        since = min(since, attributes_mark)
    return since


def refresh_segment(
    session: Session,
    warehouse: Warehouse,
    *,
    segment_id: str,
    settings: SegmentsSettings,
    now: datetime | None = None,
    full: bool = False,
) -> SegmentRefresh:
    """Re-evaluate a segment, store its members and publish who entered and who left.

    Incremental where the rule allows (see `_since`), unless `full`: either way the members,
    entries and exits are those a full evaluation gives.
    """
    row = _segment(session, segment_id)
    at = now or _now()
    fields = _warehouse_fields(warehouse)

    def compile_(touched_only: bool) -> compiler.CompiledRule:
        return compiler.compile_rule_parts(
            parse_rule(row.rule),
            catalog=_compile_catalog(fields),
            now=at,
            event_profiles_sql=lambda: _event_profiles(fields),
            resolve_segment=_resolver(session),
            segment_id=row.id,
            touched_only=touched_only,
            attributes_current=lambda: _attributes_current(fields),
            property_values=fields.values,
        )

    compiled = compile_(False)
    volatile = False
    if compiled.attributes:
        definitions = attribute_definitions(session, settings=settings)
        volatile = any(_clock_dependent(definitions.get(n)) for n in compiled.attributes)
    with _REFRESH_LOCK, warehouse.transaction() as cur:
        profiles_mark = _one(cur, queries.PROFILES_MARK)[0]
        state = {str(n): t for n, t, _ in cur.execute(queries.ALL_STATE.sql).fetchall()}
        attr_mark_text = state.get(STATE_ATTR_PROFILES)
        attributes = (
            datetime.fromisoformat(attr_mark_text) if attr_mark_text else None,
            state.get(STATE_ATTR_DIGEST),
        )
        marks_q = queries.refresh_marks(row.id)
        previous = cur.execute(marks_q.sql, marks_q.params).fetchall()
        since = (
            None
            if full
            else _since(compiled, tuple(previous[0]) if previous else None, attributes, volatile)
        )
        mode: RefreshMode
        if since is None:
            mode = "full"
            query = compiled.query
            cur.execute("CREATE OR REPLACE TEMP TABLE seg_new AS " + query.sql, query.params)
            evaluated = int(_one(cur, queries.PROFILE_COUNT)[0])
        else:
            mode = "incremental"
            for step in (
                queries.touched_profiles(since),
                queries.incremental_members(row.id, compile_(True).query),
            ):
                cur.execute(step.sql, step.params)
            evaluated = int(_one(cur, Query("SELECT count(*) FROM seg_touched"))[0])
            cur.execute("DROP TABLE seg_touched")
        seq = int(_one(cur, queries.NEXT_SEQ)[0])
        refresh_id = int(_one(cur, queries.NEXT_REFRESH_ID)[0])
        for step in (
            queries.record_changes(
                row.id, seq=seq, refresh_id=refresh_id, version=row.version, at=at
            ),
            queries.delete_exits(row.id),
            queries.insert_entries(row.id, at),
            queries.record_refresh(
                row.id,
                refresh_id=refresh_id,
                version=row.version,
                at=at,
                seq=seq,
                mode=mode,
                evaluated=evaluated,
            ),
            queries.write_refresh_marks(
                row.id,
                fingerprint=compiled.fingerprint,
                profiles_mark=profiles_mark,
                attributes_mark=attributes[0],
                attributes_digest=attributes[1],
            ),
        ):
            cur.execute(step.sql, step.params)
        size, entries, exits = _one(
            cur,
            Query(
                "SELECT size, entries, exits FROM segment_refreshes WHERE refresh_id = $r",
                {"r": refresh_id},
            ),
        )
        cur.execute("DROP TABLE seg_new")
    row.last_refreshed_at = at.replace(tzinfo=UTC)
    row.last_size = int(size)
    logger.info(
        "segment refreshed",
        extra={
            "segment": row.id,
            "size": size,
            "entries": entries,
            "exits": exits,
            "mode": mode,
            "evaluated": evaluated,
        },
    )
    return SegmentRefresh(
        row.id,
        refresh_id,
        row.version,
        at,
        int(size),
        int(entries),
        int(exits),
        mode,
        evaluated,
    )


def due_segments(session: Session, *, settings: SegmentsSettings, now: datetime) -> list[str]:
    """Ids of the segments whose refresh period has passed since their last refresh."""
    due = []
    for row in session.scalars(select(SegmentsSegment).order_by(SegmentsSegment.name)):
        minutes = row.refresh_minutes or settings.default_refresh_minutes
        last = row.last_refreshed_at
        if last is None or (now.replace(tzinfo=UTC) - last).total_seconds() >= minutes * 60:
            due.append(row.id)
    return due


def refresh_due_segments(
    db: Database, warehouse: Warehouse, *, settings: SegmentsSettings, now: datetime | None = None
) -> list[SegmentRefresh]:
    """Refresh every due segment, each in its own unit of work (one failure stops none else)."""
    at = now or _now()
    with db.begin() as session:
        due = due_segments(session, settings=settings, now=at)
    done = []
    for segment_id in due:
        try:
            with db.begin() as session:
                done.append(
                    refresh_segment(
                        session, warehouse, segment_id=segment_id, settings=settings, now=at
                    )
                )
        except (InvalidRule, SegmentNotFound) as exc:
            logger.warning(
                "segment not refreshed", extra={"segment": segment_id, "error": str(exc)}
            )
    return done


def members(
    session: Session, warehouse: Warehouse, *, segment_id: str, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:  # Any: member rows with traits JSON
    """One page of a segment's current members, by profile id."""
    _segment(session, segment_id)
    frame = warehouse.run(queries.members(segment_id, limit=limit, offset=offset))
    total = int(warehouse.scalar(queries.member_count(segment_id)))
    items = [
        {"profile_id": pid, "entered_at": entered.replace(tzinfo=UTC), "traits": _json(traits)}
        for pid, entered, traits in frame.iter_rows()
    ]
    return items, total


def person_export(session: Session, warehouse: Warehouse, profile_id: str) -> dict[str, Any]:
    """What segments hold about a profile, for identity's export (JSON-ready): the segments
    it is in (by id and name, since when) and its entries and exits, oldest first."""
    names = {
        str(sid): str(name)
        for sid, name in session.execute(select(SegmentsSegment.id, SegmentsSegment.name))
    }

    def stamp(at: datetime) -> str:
        return at.replace(tzinfo=UTC).isoformat()

    return {
        "memberships": [
            {"segment_id": sid, "segment": names.get(sid), "entered_at": stamp(entered)}
            for sid, entered in warehouse.rows(queries.profile_memberships(profile_id))
        ],
        "history": [
            {"segment_id": sid, "segment": names.get(sid), "kind": kind, "at": stamp(at)}
            for sid, kind, at in warehouse.rows(queries.profile_segment_events(profile_id))
        ],
    }


ExportFormat = Literal["csv", "parquet"]
EXPORT_BATCH_ROWS = 50_000


class _Sink(io.RawIOBase):
    """A write-only file whose bytes are collected and handed out as they come."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        """Always writable."""
        return True

    def write(self, data: Any) -> int:  # Any: a bytes-like buffer
        """Collect bytes."""
        chunk = bytes(data)
        self.chunks.append(chunk)
        return len(chunk)

    def take(self) -> bytes:
        """The bytes written since the last take."""
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


def export_members(
    session: Session, warehouse: Warehouse, *, segment_id: str, fmt: ExportFormat
) -> Iterator[bytes]:
    """A segment's members with traits and attributes, streamed as CSV or Parquet bytes."""
    _segment(session, segment_id)
    query = queries.export_members(segment_id)

    def stream() -> Iterator[bytes]:
        with warehouse.cursor() as cur:
            reader = cur.sql(query.sql, params=query.params).to_arrow_reader(EXPORT_BATCH_ROWS)
            sink = _Sink()
            writer: pa_csv.CSVWriter | pq.ParquetWriter
            if fmt == "csv":
                writer = pa_csv.CSVWriter(sink, reader.schema)
            else:
                writer = pq.ParquetWriter(sink, reader.schema)
            with writer:
                for batch in reader:
                    writer.write_table(pa.Table.from_batches([batch]))
                    if chunk := sink.take():
                        yield chunk
            if chunk := sink.take():
                yield chunk

    return stream()


def segment_sizes(
    session: Session, warehouse: Warehouse, *, segment_id: str, limit: int, offset: int
) -> tuple[pl.DataFrame, int]:
    """The refreshes of a segment (size, entries, exits), newest first."""
    _segment(session, segment_id)
    frame = warehouse.run(queries.refreshes(segment_id, limit=limit, offset=offset))
    return frame, int(warehouse.scalar(queries.refresh_count(segment_id)))


def segment_events_since(
    warehouse: Warehouse, *, after_seq: int, segment_id: str | None = None, limit: int = 10_000
) -> pl.DataFrame:
    """Published entries and exits after `after_seq`, in order (for activation and loyalty).

    Columns: seq, segment_id, profile_id, kind ('entry' | 'exit'), occurred_at, refresh_id,
    segment_version.
    """
    return warehouse.run(queries.events_since(after_seq, segment_id, limit))


def find_segment(session: Session, *, segment_id: str) -> SegmentsSegment | None:
    """One saved segment, or None (read-only; used by the dashboards' segment selectors)."""
    return session.get(SegmentsSegment, segment_id)
