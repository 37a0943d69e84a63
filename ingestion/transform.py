"""Records to events in bulk: a source's mapping (CSV, Parquet, databases) or the Segment
spec (NDJSON lines), applied to a whole chunk with Polars expressions, never row by row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import phonenumbers
import polars as pl

from cdp.identifiers import (
    ANONYMOUS_ID,
    DEVICE_ID,
    EMAIL,
    PHONE,
    PLACEHOLDERS,
    USER_ID,
    composite_expr,
    email_expr,
    id_expr,
    normalise_phones,
)
from ingestion.connectors import MALFORMED, ROW
from ingestion.loader import EVENT_SCHEMA, IDENTIFIER_SCHEMA, REJECTION_SCHEMA, TS, LoadInput
from ingestion.schemas import IdentifierSpec, Mapping
from ingestion.tracking import MESSAGE_TYPES

Hasher = Callable[[pl.Series], pl.Series]

_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M")


@dataclass(frozen=True, slots=True)
class Context:
    """What every chunk of one import shares."""

    source_id: str
    channel: str
    region: str
    received_at: datetime
    import_id: str | None
    hasher: Hasher


def column(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A column by name, or a dotted path into struct columns; null when absent."""
    if name in frame.columns:
        return pl.col(name)
    head, *rest = name.split(".")
    if head not in frame.columns or not rest:
        return pl.lit(None)
    dtype = frame.schema[head]
    expr = pl.col(head)
    for part in rest:
        if not isinstance(dtype, pl.Struct):
            return pl.lit(None)
        fields = {f.name: f.dtype for f in dtype.fields}
        if part not in fields:
            return pl.lit(None)
        expr = expr.struct.field(part)
        dtype = fields[part]  # type: ignore[assignment]  # polars types fields loosely
    return expr


def _series(frame: pl.DataFrame, expr: pl.Expr) -> pl.Series:
    """Evaluate an expression over a chunk, broadcasting literals to its height."""
    return frame.select(pl.col(ROW), expr.alias("_value"))["_value"]


def _dtype_of(frame: pl.DataFrame, name: str) -> pl.DataType:
    return frame.select(column(frame, name)).dtypes[0]


def timestamp_expr(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Parse a timestamp column of any common form into naive UTC microseconds."""
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone:
            expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return expr.cast(TS)
    if isinstance(dtype, pl.Date):
        return expr.cast(TS)
    if dtype == pl.String:
        return pl.coalesce(_timestamp_candidates(expr.str.strip_chars()))
    return pl.lit(None, dtype=TS)


def _timestamp_candidates(text: pl.Expr) -> list[pl.Expr]:
    """The forms a timestamp string is read in, first match wins."""
    return [
        text.str.to_datetime("%+", strict=False, time_unit="us")
        .dt.convert_time_zone("UTC")
        .dt.replace_time_zone(None),
        *(text.str.to_datetime(f, strict=False, time_unit="us") for f in _ISO_FORMATS),
        text.str.to_date("%Y-%m-%d", strict=False).cast(TS),
    ]


def timestamps(frame: pl.DataFrame, expr: pl.Expr, dtype: pl.DataType) -> pl.Series:
    """`timestamp_expr` evaluated over a chunk, each later form tried only on the rows the
    earlier ones left null (the same values as the coalesce, without parsing every row six
    times when most rows are in the first form)."""
    if dtype != pl.String:
        return _series(frame, timestamp_expr(expr, dtype))
    text = _series(frame, expr.str.strip_chars()).alias("t")
    candidates = _timestamp_candidates(pl.col("t"))
    parsed = text.to_frame().select(candidates[0])[:, 0].alias("ts")
    for candidate in candidates[1:]:
        todo = parsed.is_null() & text.is_not_null()
        if not todo.any():
            break
        found = text.filter(todo).to_frame().select(candidate)[:, 0]
        parsed = parsed.scatter(todo.arg_true(), found)
    return parsed


def _json(frame: pl.DataFrame, names: list[str]) -> pl.Expr:
    """The mapped columns as one JSON object per row (always valid JSON: the loader stores
    it without parsing it again)."""
    if not names:
        return pl.lit(None, dtype=pl.String)
    return pl.struct([_jsonable(frame, n).alias(n) for n in names]).struct.json_encode()


def _jsonable(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A column as Polars can write it to JSON: bytes (a Parquet BINARY column) as base64
    text, which Polars' JSON writer does not do itself (it panics)."""
    if _dtype_of(frame, name) == pl.Binary:
        return column(frame, name).bin.encode("base64")
    return column(frame, name)


def _json_column(frame: pl.DataFrame, name: str) -> pl.Expr:
    """An object of a Segment message as JSON text: a struct column encoded, or a column
    already holding JSON text (the file connector's NDJSON reader); null when absent."""
    if name not in frame.columns:
        return pl.lit(None, dtype=pl.String)
    dtype = frame.schema[name]
    if isinstance(dtype, pl.Struct):
        return pl.col(name).struct.json_encode()
    if dtype == pl.String:
        return pl.col(name)
    return pl.lit(None, dtype=pl.String)


@lru_cache(maxsize=64)
def _phone_plan(region: str) -> tuple[str, str, tuple[int, ...]] | None:
    """(country code, national number pattern, possible lengths) of a region whose numbers
    read as `phonenumbers` reads them with plain string rules, or None.

    That holds when the country code belongs to this region only, the trunk prefix is a
    plain `0` with no transform rule and the international prefix is `00` (France,
    Germany, Belgium, ...): then `0` + NSN, `+cc` + NSN and `00cc` + NSN all mean `+cc` +
    NSN, and `phonenumbers.is_possible_number` is a check of the NSN's length.
    """
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region.upper())
    if meta is None or meta.general_desc is None:
        return None
    code = meta.country_code
    if code is None or len(phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code, ())) != 1:
        return None
    if meta.national_prefix != "0" or (meta.national_prefix_for_parsing or "0") != "0":
        return None
    if meta.national_prefix_transform_rule or meta.international_prefix != "00":
        return None
    pattern = meta.general_desc.national_number_pattern
    lengths = tuple(meta.general_desc.possible_length or ())
    if not pattern or not lengths:
        return None
    return str(code), pattern, lengths


def phones(values: pl.Series, *, region: str) -> pl.Series:
    """Phones to E.164 as `cdp.identifiers.normalise_phone` reads them, vectorised.

    Numbers written in the common forms of the region (`06 12 34 56 78`, `+33 6 12...`,
    `0033 6...`, `+33 (0)6...`, `6 12 34 56 78`, with spaces, dots, dashes, slashes or
    parentheses) are rewritten with Polars string expressions; everything else (other
    countries, extensions, letters, placeholders) goes to `phonenumbers`, once per distinct
    value. Tests check that both paths agree.
    """
    plan = _phone_plan(region)
    if plan is None:
        return normalise_phones(values, region=region)
    code, pattern, lengths = plan
    raw = pl.col("raw")
    digits = raw.str.replace_all(r"[\s().\-/]", "")
    # The national significant number after `0`, `+cc`, `00cc` (either maybe followed by
    # the trunk `0`, as in `+33 (0)6...`, which phonenumbers strips too) or no prefix.
    nsn = digits.str.extract(rf"^(?:0|(?:\+|00){code}0?)?([1-9][0-9]*)$", 1)
    placeholder = raw.str.strip_chars().str.to_lowercase().is_in(sorted(PLACEHOLDERS)) | (
        digits.str.strip_chars_start("+").str.contains(_REPEATED)
    )
    fast = (
        values.cast(pl.String)
        .to_frame("raw")
        .select(
            pl.when(
                nsn.str.len_chars().is_in(list(lengths))
                & nsn.str.contains(f"^(?:{pattern})$")
                & ~placeholder
            )
            .then(pl.lit("+" + code) + nsn)
            .alias("e164")
        )["e164"]
    )
    slow = fast.is_null() & values.is_not_null()
    if slow.any():
        fast = fast.scatter(slow.arg_true(), normalise_phones(values.filter(slow), region=region))
    return fast.alias(values.name)


_REPEATED = "^(?:" + "|".join(f"{d}+" for d in "0123456789") + ")$"


@dataclass(frozen=True, slots=True)
class Identified:
    """The normalised identifiers of a chunk, one column per mapped source aligned with its rows.

    Kept column-wise (not as a long frame) so that the per-row checks and the first value of
    a kind are vectorised comparisons, with no join, `is_in` or `unique` over the chunk.
    """

    # (kind, normalised values aligned with the chunk's rows, null where absent or dropped)
    parts: list[tuple[str, pl.Series]]
    # Identifier values dropped per row (placeholders, invalid values).
    dropped: pl.Series

    def has_any(self, height: int) -> pl.Series:
        """Whether each row has at least one usable identifier."""
        if not self.parts:
            return pl.Series("has", [False] * height, dtype=pl.Boolean)
        return pl.DataFrame(
            [v.is_not_null().alias(str(i)) for i, (_, v) in enumerate(self.parts)]
        ).select(pl.any_horizontal(pl.all()))[:, 0]

    def first(self, kind: str) -> pl.Expr:
        """The first value of `kind` of each row (mapping order), as a literal column."""
        values = [v for k, v in self.parts if k == kind]
        if not values:
            return pl.lit(None, dtype=pl.String)
        return pl.coalesce([pl.lit(v) for v in values])

    def long(self, rows: pl.Series, keep: pl.Series) -> pl.DataFrame:
        """(row, kind, value) of the kept rows; a value repeated under one kind counts once."""
        frames: list[pl.DataFrame] = []
        for i, (kind, values) in enumerate(self.parts):
            mask = keep & values.is_not_null()
            for earlier_kind, earlier in self.parts[:i]:
                if earlier_kind == kind:
                    mask = mask & (earlier.is_null() | (earlier != values))
            frames.append(
                pl.DataFrame(
                    {ROW: rows.filter(mask), "value": values.filter(mask).cast(pl.String)}
                ).select(ROW, kind=pl.lit(kind, dtype=pl.String), value="value")
            )
        if not frames:
            return pl.DataFrame(schema=IDENTIFIER_SCHEMA)
        return pl.concat(frames).cast(IDENTIFIER_SCHEMA)  # type: ignore[arg-type]


def _identifiers(
    frame: pl.DataFrame,
    found: list[tuple[str, pl.Expr]],
    composites: list[IdentifierSpec],
    ctx: Context,
) -> Identified:
    """Normalise every mapped identifier of a chunk; count the values dropped per row.

    The raw values and the dropped counts are each one `select` over every mapped
    identifier. Each rule runs on the values present only: most identifier columns are
    mostly null (an email on one web event in twenty), and Polars' string kernels cost
    nearly as much on a null slot as on a value.
    """
    parts: list[tuple[str, pl.Series]] = []
    raw_names = [f"r{i}" for i in range(len(found))]
    raws = frame.select(
        pl.col(ROW),
        *(raw.cast(pl.String).alias(n) for (_, raw), n in zip(found, raw_names, strict=True)),
    )
    columns: list[pl.Series] = []
    for i, ((kind, _), n) in enumerate(zip(found, raw_names, strict=True)):
        values = _on_present(raws[n], kind, ctx.region).alias("v")
        parts.append((kind, values))
        columns.append(values.alias(f"n{i}"))
    if found:
        terms = []
        for i, n in enumerate(raw_names):
            stripped = pl.col(n).str.strip_chars()
            dropped_expr = (stripped.is_not_null() & (stripped != "")) & pl.col(f"n{i}").is_null()
            terms.append(dropped_expr.cast(pl.Int64))
        dropped = raws.with_columns(columns).select(pl.sum_horizontal(terms).alias("dropped"))[
            "dropped"
        ]
    else:
        dropped = pl.Series("dropped", [0] * frame.height, dtype=pl.Int64)
    for spec in composites:
        assert spec.composite is not None
        values = _series(frame, composite_expr([column(frame, p) for p in spec.composite]))
        parts.append((spec.kind, values))
    return Identified(parts, dropped)


def _on_present(values: pl.Series, kind: str, region: str) -> pl.Series:
    """The normalised values of one identifier column, the rule run on its non-null values
    only; nulls stay in place."""
    nulls = values.null_count()
    if nulls == len(values):
        return pl.repeat(None, len(values), dtype=pl.String, eager=True)
    if nulls == 0:
        return _normalised(values, kind, region)
    present = values.is_not_null()
    normal = _normalised(values.filter(present), kind, region)
    return pl.repeat(None, len(values), dtype=pl.String, eager=True).scatter(
        present.arg_true(), normal
    )


def _normalised(values: pl.Series, kind: str, region: str) -> pl.Series:
    if kind == PHONE:
        return phones(values, region=region)
    rule = email_expr if kind == EMAIL else id_expr
    return values.to_frame("v").select(rule(pl.col("v")))["v"]


def _finish(
    frame: pl.DataFrame,
    events: pl.DataFrame,
    identified: Identified,
    reason: pl.Expr,
    ctx: Context,
) -> LoadInput:
    """Split a chunk into stored events and rejected rows, given a reason expression."""
    missing = ~identified.has_any(frame.height)
    reasons = frame.select(
        pl.coalesce(reason, pl.when(pl.lit(missing)).then(pl.lit("missing identifier")))
    )[:, 0]
    good_mask = reasons.is_null()
    good = events.filter(good_mask)
    bad = events.select(ROW, "message_id").filter(~good_mask)
    rejections = bad.select(
        source_id=pl.lit(ctx.source_id),
        position=pl.col(ROW),
        message_id=pl.col("message_id"),
        reason=pl.lit(reasons.filter(~good_mask)),
    )
    kept_dropped = int(identified.dropped.filter(good_mask).sum())
    return LoadInput(
        channel=ctx.channel,
        events=good.select(list(EVENT_SCHEMA)).cast(EVENT_SCHEMA),  # type: ignore[arg-type]
        identifiers=identified.long(frame[ROW], good_mask),
        rejections=rejections.cast(REJECTION_SCHEMA),  # type: ignore[arg-type]
        dropped={ctx.source_id: kept_dropped},
        import_id=ctx.import_id,
    )


def _row_keys(frame: pl.DataFrame, ctx: Context) -> pl.Series:
    """A stable id per row from its content, so the same record seen twice dedupes."""
    fields = [name for name in frame.columns if name not in (ROW, MALFORMED)]
    # A chunk of unparseable lines only has no content: its rows are rejected anyway.
    encoded = _json(frame, fields) if fields else pl.lit("{}")
    content = _series(frame, encoded)
    return ("row-" + ctx.hasher(content)).alias("message_id")


def mapped(frame: pl.DataFrame, mapping: Mapping, ctx: Context) -> LoadInput:
    """Apply a source's mapping to a chunk of tabular records."""
    if mapping.message_id:
        message_id = _series(
            frame, column(frame, mapping.message_id).cast(pl.String).str.strip_chars()
        )
    else:
        message_id = _row_keys(frame, ctx)
    ts_name = mapping.timestamp
    if ts_name:
        raw_ts = column(frame, ts_name)
        ts = pl.lit(timestamps(frame, raw_ts, _dtype_of(frame, ts_name)))
        ts_reason: pl.Expr = (
            pl.when(raw_ts.is_null())
            .then(pl.lit("missing timestamp"))
            .when(ts.is_null())
            .then(pl.lit("unparseable timestamp ") + raw_ts.cast(pl.String).str.slice(0, 40))
        )
    else:
        ts = pl.lit(ctx.received_at, dtype=TS)
        ts_reason = pl.lit(None, dtype=pl.String)
    if mapping.event_column:
        event = column(frame, mapping.event_column).cast(pl.String).str.strip_chars()
    else:
        event = pl.lit(mapping.event, dtype=pl.String)
    event_reason = (
        pl.when(event.is_null() | (event == "")).then(pl.lit("missing event name"))
        if mapping.type == "track"
        else pl.lit(None, dtype=pl.String)
    )
    found = [
        (spec.kind, column(frame, spec.column))
        for spec in mapping.identifiers
        if spec.column is not None
    ]
    composites = [s for s in mapping.identifiers if s.composite is not None]
    identified = _identifiers(frame, found, composites, ctx)

    events = frame.select(
        pl.col(ROW),
        message_id=pl.Series(message_id),
        source_id=pl.lit(ctx.source_id),
        type=pl.lit(mapping.type),
        event=event if mapping.type == "track" else pl.lit(None, dtype=pl.String),
        user_id=identified.first(USER_ID),
        anonymous_id=identified.first(ANONYMOUS_ID),
        timestamp=ts,
        received_at=pl.lit(ctx.received_at, dtype=TS),
        properties=_json(frame, mapping.properties),
        traits=_json(frame, mapping.traits),
        context=pl.lit(None, dtype=pl.String),
        sent_at=pl.lit(None, dtype=TS),
        original_timestamp=pl.lit(None, dtype=TS),
        previous_id=pl.lit(None, dtype=pl.String),
        group_id=pl.lit(None, dtype=pl.String),
    )
    reason = pl.coalesce(ts_reason, event_reason)
    return _finish(frame, events, identified, reason, ctx)


# The Segment message's scalar fields that `segment` reads, most of them more than once.
SEGMENT_SCALARS = (
    "messageId",
    "type",
    "event",
    "name",
    "userId",
    "anonymousId",
    "previousId",
    "groupId",
    "timestamp",
    "sentAt",
)


def segment(frame: pl.DataFrame, mapping: Mapping, ctx: Context) -> LoadInput:
    """Read a chunk of Segment-spec messages (NDJSON lines, as exported by Segment)."""
    raw = frame
    # Each scalar field as trimmed text, computed once (an expression is evaluated anew
    # wherever it appears); the row keys below still hash the lines as read.
    trimmed = [n for n in SEGMENT_SCALARS if n in frame.columns and frame.schema[n] != pl.Null]
    frame = frame.with_columns(pl.col(n).cast(pl.String).str.strip_chars() for n in trimmed)

    def text(name: str) -> pl.Expr:
        if name in trimmed:
            return pl.col(name)
        expr = column(frame, name)
        return (
            expr.cast(pl.String).str.strip_chars()
            if _dtype_of(frame, name) != pl.Null
            else (pl.lit(None, dtype=pl.String))
        )

    message_id = _series(frame, text("messageId"))
    if message_id.null_count():
        message_id = message_id.fill_null(_row_keys(raw, ctx))
    kind = text("type")
    ts_raw = text("timestamp")
    ts = pl.lit(timestamps(frame, ts_raw, pl.String()))
    sent_raw = text("sentAt")
    found: list[tuple[str, pl.Expr]] = [
        (USER_ID, text("userId")),
        (ANONYMOUS_ID, text("anonymousId")),
        (ANONYMOUS_ID, pl.when(kind == "alias").then(text("previousId"))),
        (EMAIL, pl.when(kind != "group").then(text("traits.email"))),
        (EMAIL, text("context.traits.email")),
        (PHONE, pl.when(kind != "group").then(text("traits.phone"))),
        (PHONE, text("context.traits.phone")),
        (DEVICE_ID, text("context.device.id")),
    ]
    for spec in mapping.identifiers:
        if spec.column is not None:
            found.append((spec.kind, text(spec.column)))
    composites = [s for s in mapping.identifiers if s.composite is not None]
    identified = _identifiers(frame, found, composites, ctx)
    traits = _json_column(frame, "traits")
    context_traits = (
        column(frame, "context.traits").struct.json_encode()
        if isinstance(_dtype_of(frame, "context.traits"), pl.Struct)
        else _json_column(frame, "context.traits")
    )
    events = frame.select(
        pl.col(ROW),
        message_id=pl.Series(message_id),
        source_id=pl.lit(ctx.source_id),
        type=kind,
        event=pl.when(kind == "track")
        .then(text("event"))
        .when(kind.is_in(["page", "screen"]))
        .then(text("name")),
        user_id=text("userId"),
        anonymous_id=text("anonymousId"),
        timestamp=ts,
        received_at=pl.lit(ctx.received_at, dtype=TS),
        properties=_json_column(frame, "properties"),
        traits=pl.when(kind == "identify")
        .then(pl.coalesce(traits, context_traits))
        .otherwise(traits),
        context=_json_column(frame, "context"),
        sent_at=pl.lit(timestamps(frame, sent_raw, pl.String())),
        # A file's stored timestamp is the message's own (no clock-skew correction, which
        # only the tracking API does): `original_timestamp` would repeat it.
        original_timestamp=pl.lit(None, dtype=TS),
        previous_id=text("previousId"),
        group_id=text("groupId"),
    )
    reason = (
        pl.when(column(frame, MALFORMED).is_not_null())
        .then(column(frame, MALFORMED).cast(pl.String))
        .when(~kind.is_in(sorted(MESSAGE_TYPES)) | kind.is_null())
        .then(pl.lit("unknown type"))
        .when((kind == "alias") & (text("previousId").is_null() | text("userId").is_null()))
        .then(pl.lit("alias needs previousId and userId"))
        .when((kind != "alias") & text("userId").is_null() & text("anonymousId").is_null())
        .then(pl.lit("userId or anonymousId is required"))
        .when((kind == "track") & text("event").is_null())
        .then(pl.lit("track needs an event name"))
        .when(ts_raw.is_null())
        .then(pl.lit("missing timestamp"))
        .when(ts.is_null())
        .then(pl.lit("unparseable timestamp"))
    )
    return _finish(frame, events, identified, reason, ctx)
