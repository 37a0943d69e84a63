"""The mapping's per-row rules in DuckDB SQL: identifiers, phones, timestamps, trims.

`transform.mapped` and `transform.segment` apply a mapping with Polars expressions; this
module computes the same columns with one DuckDB `SELECT` per chunk, on a scratch
in-memory database of the import's reader thread (DuckDB runs the rules on every core,
with no Python in the loop). What SQL cannot do exactly as the Polars rules do is routed,
row by row, to those rules:

- ids and emails that are not pure ASCII (Polars' Unicode lower-casing is the reference);
- phones that the SQL rewrite of the region's common forms does not turn into E.164
  (`transform.phones`, so `phonenumbers` for the odd ones, once per distinct value);
- timestamps not in the forms below, or that DuckDB cannot read (`transform.timestamps`).

Timestamps read in SQL: `YYYY-MM-DD`, `YYYY-MM-DD[T ]HH:MM[:SS[.f{1,6}]]` (naive, UTC) and
`YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|+HH:MM|-HH:MM)`. Every other string goes to Polars.

The SQL never holds a source's column names or values: the chunk is first projected in
Polars to columns with fixed names (`r0`, `r1`... for the mapped identifiers), and the
only constants spelled into the SQL are this module's own and the `phonenumbers`
metadata of the region (its country code and national number pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

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
)
from cdp.warehouse import Warehouse
from ingestion import transform
from ingestion.connectors import MALFORMED, ROW
from ingestion.loader import TS, LoadInput
from ingestion.schemas import IdentifierSpec, Mapping
from ingestion.tracking import MESSAGE_TYPES
from ingestion.transform import Context, Identified

# Unicode White_Space, what Polars' `strip_chars()` (Rust's `trim`) strips.
WHITESPACE = "".join(
    chr(c)
    for c in (
        *range(0x09, 0x0E),
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    )
)
# The ASCII part of it as an RE2 class body (RE2's `\s` lacks \v).
_ASCII_WS = r"\t\n\x0B\f\r "
_REPEATED = (
    rf"^[{_ASCII_WS}().\-/+]*(?:"
    + "|".join(f"{d}(?:[{_ASCII_WS}().\\-/]*{d})+" for d in "0123456789")
    + rf")[{_ASCII_WS}().\-/]*$"
)
_EMAIL = rf"[^@{_ASCII_WS}]+@[^@{_ASCII_WS}]+\.[^@{_ASCII_WS}]+"
_TS = (
    r"^([1-9][0-9]{3}-[0-9]{2}-[0-9]{2})(?:([T ])([01][0-9]|2[0-3]):([0-5][0-9])"
    r"(?::([0-5][0-9])(\.[0-9]{1,6})?)?(Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?)?$"
)
CHUNK = "ingest_sql_chunk"
# The scratch database holds one chunk and its rules' output at a time.
SCRATCH_MEMORY = "1GB"


def _literal(text: str) -> str:
    """A SQL string literal of one of this module's constants (never a user value)."""
    return "'" + text.replace("'", "''") + "'"


_PLACEHOLDER_LIST = ", ".join(_literal(p) for p in sorted(PLACEHOLDERS))


def _trim(expr: str) -> str:
    return f"trim({expr}, $ws)"


def _ascii(expr: str) -> str:
    return f"(strlen({expr}) = length({expr}))"


def _placeholder(folded: str) -> str:
    """Whether an ASCII, trimmed, lower-cased value is a placeholder (`_placeholder_expr`)."""
    repeated = _literal(_REPEATED)
    return f"({folded} IN ({_PLACEHOLDER_LIST}) OR regexp_matches({folded}, {repeated}))"


def id_sql(raw: str) -> tuple[str, str]:
    """(normalised, fallback) of an id column: `id_expr` for ASCII values, else the raw
    value for Polars."""
    text = _trim(raw)
    folded = f"lower({text})"
    return (
        f"CASE WHEN {_ascii(raw)} AND NOT {_placeholder(folded)} THEN {text} END",
        f"CASE WHEN NOT {_ascii(raw)} THEN {raw} END",
    )


def email_sql(raw: str) -> tuple[str, str]:
    """(normalised, fallback) of an email column: `email_expr` for ASCII values."""
    text = f"lower({_trim(raw)})"
    ok = f"regexp_full_match({text}, {_literal(_EMAIL)}) AND NOT {_placeholder(text)}"
    return (
        f"CASE WHEN {_ascii(raw)} AND {ok} THEN {text} END",
        f"CASE WHEN NOT {_ascii(raw)} THEN {raw} END",
    )


def phone_nsn_sql(raw: str, region: str) -> str:
    """The national significant number SQL reads in a phone column ('' when none)."""
    plan = transform.phone_plan(region)
    if plan is None:
        return "''"
    code = plan[0]
    assert code.isdigit()
    noise = _literal(f"[{_ASCII_WS}().\\-/]")
    prefix = _literal(f"^(?:0|(?:\\+|00){code}0?)?([1-9][0-9]*)$")
    return f"regexp_extract(regexp_replace({raw}, {noise}, '', 'g'), {prefix}, 1)"


def phone_sql(raw: str, nsn: str, region: str) -> tuple[str, str]:
    """(normalised, fallback) of a phone column whose NSN is in column `nsn`:
    `transform.phones`' rewrite of the region's common forms for ASCII values; every other
    non-null value falls back (to `transform.phones`, so `phonenumbers` for odd forms)."""
    plan = transform.phone_plan(region)
    if plan is None:
        return "NULL::VARCHAR", raw
    code, pattern, lengths = plan
    noise = _literal(f"[{_ASCII_WS}().\\-/]")
    digits = f"regexp_replace({raw}, {noise}, '', 'g')"
    repeated = _literal("^(?:" + "|".join(f"{d}+" for d in "0123456789") + ")$")
    placeholder = (
        f"(lower({_trim(raw)}) IN ({_PLACEHOLDER_LIST})"
        f" OR regexp_matches(ltrim({digits}, '+'), {repeated}))"
    )
    lengths_sql = ", ".join(str(int(n)) for n in lengths)
    normal = (
        f"CASE WHEN {_ascii(raw)} AND length({nsn}) IN ({lengths_sql})"
        f" AND regexp_full_match({nsn}, {_literal(pattern)}) AND NOT {placeholder}"
        f" THEN {_literal('+' + code)} || {nsn} END"
    )
    return normal, f"CASE WHEN {raw} IS NOT NULL AND ({normal}) IS NULL THEN {raw} END"


def timestamp_parts_sql(raw: str) -> str:
    """The parts of a timestamp text (a struct; all '' when not a form SQL reads)."""
    names = "['d', 'sep', 'h', 'mi', 's', 'f', 'tz']"
    return f"regexp_extract({_trim(raw)}, {_literal(_TS)}, {names})"


def timestamp_sql(p: str) -> str:
    """Naive UTC timestamp from the parts in struct column `p`, null when SQL cannot read it."""
    clock = f"{p}.h || ':' || {p}.mi || ':'"
    offset = (
        f"CASE WHEN {p}.tz = 'Z' THEN INTERVAL 0 MINUTE"
        f" ELSE to_minutes((CASE WHEN {p}.tz[1] = '-' THEN -1 ELSE 1 END)"
        f" * ({p}.tz[2:3]::INTEGER * 60 + {p}.tz[5:6]::INTEGER)) END"
    )
    return (
        f"CASE WHEN {p}.d = '' THEN NULL"
        f" WHEN {p}.sep = '' THEN TRY_CAST({p}.d AS DATE)::TIMESTAMP"
        f" WHEN {p}.tz = '' THEN TRY_CAST({p}.d || ' ' || {clock}"
        f" || CASE WHEN {p}.s = '' THEN '00' ELSE {p}.s END || {p}.f AS TIMESTAMP)"
        f" WHEN {p}.sep = 'T' AND {p}.s <> '' THEN TRY_CAST({p}.d || ' ' || {clock}"
        f" || {p}.s || {p}.f AS TIMESTAMP) - {offset}"
        f" END"
    )


@dataclass(frozen=True, slots=True)
class _Ident:
    kind: str
    index: int  # the column `r{index}` of the projected chunk


class SqlRules:
    """The rules for one import: a scratch DuckDB, opened on first use by the reader thread."""

    def __init__(self, region: str) -> None:
        self.region = region
        self._scratch: Warehouse | None = None

    def close(self) -> None:
        """Close the scratch database."""
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def run(self, frame: pl.DataFrame, sql: str) -> pl.DataFrame:
        """Run `sql` over `frame` registered as the chunk."""
        if self._scratch is None:
            self._scratch = Warehouse(":memory:", memory_limit=SCRATCH_MEMORY).open()
        with self._scratch.cursor() as cur:
            cur.register(CHUNK, frame.to_arrow(compat_level=pl.CompatLevel.newest()))
            try:
                table: pa.Table = cur.sql(sql, params={"ws": WHITESPACE}).to_arrow_table()
            finally:
                cur.unregister(CHUNK)
        out = pl.from_arrow(table)
        assert isinstance(out, pl.DataFrame)
        return out

    def select(
        self,
        frame: pl.DataFrame,
        raws: list[str],
        idents: list[_Ident],
        columns: list[str],
        timestamps: dict[str, str],
    ) -> pl.DataFrame:
        """One SELECT over the chunk: `raws` (SQL of each identifier's raw value, `r{i}`),
        the identifier rules of `idents` (n{i}, f{i}, e{i}), `columns` (SQL over the
        chunk's columns) and `timestamps` (output name -> text column)."""
        inner = ["*", *(f"{raw} AS r{i}" for i, raw in enumerate(raws))]
        inner += [f"{timestamp_parts_sql(col)} AS p_{name}" for name, col in timestamps.items()]
        middle = ["*"]
        middle += [
            f"{phone_nsn_sql(f'r{i.index}', self.region)} AS nsn{i.index}"
            for i in idents
            if i.kind == PHONE
        ]
        outer = [*columns]
        outer += [f"{timestamp_sql(f'p_{name}')} AS {name}" for name in timestamps]
        for ident in idents:
            raw = f"r{ident.index}"
            if ident.kind == PHONE:
                normal, fallback = phone_sql(raw, f"nsn{ident.index}", self.region)
            elif ident.kind == EMAIL:
                normal, fallback = email_sql(raw)
            else:
                normal, fallback = id_sql(raw)
            outer.append(f"{normal} AS n{ident.index}")
            outer.append(f"{fallback} AS f{ident.index}")
            outer.append(f"{_trim(raw)} <> '' AS e{ident.index}")
        # This module's SQL over the fixed column names of the projection; values bound.
        inner_sql = f"SELECT {', '.join(inner)} FROM {CHUNK}"  # noqa: S608
        middle_sql = f"SELECT {', '.join(middle)} FROM ({inner_sql})"  # noqa: S608
        sql = f"SELECT {', '.join(outer)} FROM ({middle_sql})"  # noqa: S608
        return self.run(frame, sql)

    def identified(
        self,
        staged: pl.DataFrame,
        idents: list[_Ident],
        composites: list[tuple[str, pl.Series]],
    ) -> Identified:
        """The identifiers of a staged chunk, fallbacks filled by the Polars rules."""
        parts: list[tuple[str, pl.Series]] = []
        dropped_terms: list[pl.Series] = []
        for ident in idents:
            values = staged[f"n{ident.index}"]
            fallback = staged[f"f{ident.index}"]
            todo = fallback.is_not_null()
            if todo.any():
                raw = fallback.filter(todo)
                if ident.kind == PHONE:
                    filled = transform.phones(raw.alias("v"), region=self.region)
                else:
                    rule = email_expr if ident.kind == EMAIL else id_expr
                    filled = raw.to_frame("v").select(rule(pl.col("v")))[:, 0]
                values = values.scatter(todo.arg_true(), filled)
            values = values.alias("v")
            parts.append((ident.kind, values))
            blank = staged[f"e{ident.index}"].fill_null(False)
            dropped_terms.append((blank & values.is_null()).cast(pl.Int64).alias(str(ident.index)))
        parts.extend(composites)
        if dropped_terms:
            dropped = pl.DataFrame(dropped_terms).select(
                pl.sum_horizontal(pl.all()).alias("dropped")
            )["dropped"]
        else:
            dropped = pl.Series("dropped", [0] * staged.height, dtype=pl.Int64)
        return Identified(parts, dropped)

    def timestamps(self, staged: pl.DataFrame, name: str, raw: pl.Series) -> pl.Series:
        """The SQL-parsed column `name`, the rows SQL left null parsed by the Polars rule."""
        parsed = staged[name].cast(TS)
        todo = parsed.is_null() & raw.is_not_null()
        if todo.any():
            text = raw.filter(todo).to_frame("t").with_row_index(ROW)
            found = transform.timestamps(text, pl.col("t"), pl.String())
            parsed = parsed.scatter(todo.arg_true(), found)
        return parsed


def _composites(
    frame: pl.DataFrame, composites: list[IdentifierSpec]
) -> list[tuple[str, pl.Series]]:
    out: list[tuple[str, pl.Series]] = []
    for spec in composites:
        assert spec.composite is not None
        expr = composite_expr([transform.column(frame, p) for p in spec.composite])
        out.append((spec.kind, frame.select(expr.alias("v"))["v"]))
    return out


def _text(frame: pl.DataFrame, name: str) -> pl.Expr:
    """A column (or dotted path) of the chunk as text, null when absent."""
    if transform.dtype_of(frame, name) == pl.Null:
        return pl.lit(None, dtype=pl.String)
    return transform.column(frame, name).cast(pl.String)


def mapped(frame: pl.DataFrame, mapping: Mapping, ctx: Context, rules: SqlRules) -> LoadInput:
    """`transform.mapped` with the per-row rules in SQL (same result)."""
    specs = [spec for spec in mapping.identifiers if spec.column is not None]
    idents = [_Ident(spec.kind, i) for i, spec in enumerate(specs)]
    project: list[pl.Expr | pl.Series] = [pl.col(ROW)]
    project += [
        _text(frame, spec.column).alias(f"c{i}") for i, spec in enumerate(specs) if spec.column
    ]
    columns: list[str] = []
    if mapping.message_id:
        project.append(_text(frame, mapping.message_id).alias("mid"))
        columns.append(f"{_trim('mid')} AS message_id")
    else:
        project.append(transform.row_content(frame).alias("content"))
        columns.append("'row-' || md5(content) AS message_id")
    ts_name = mapping.timestamp
    ts_text = ts_name is not None and transform.dtype_of(frame, ts_name) == pl.String
    if ts_text:
        assert ts_name is not None
        project.append(transform.column(frame, ts_name).alias("ts_raw"))
    if mapping.event_column:
        project.append(_text(frame, mapping.event_column).alias("ev"))
        columns.append(f"{_trim('ev')} AS event")
    staged_in = frame.select(project)
    staged = rules.select(
        staged_in,
        [f"c{i}" for i in range(len(specs))],
        idents,
        columns,
        {"ts": "ts_raw"} if ts_text else {},
    )

    if ts_name:
        raw_ts = transform.column(frame, ts_name)
        if ts_text:
            ts_series = rules.timestamps(staged, "ts", staged_in["ts_raw"])
        else:
            ts_series = transform.timestamps(frame, raw_ts, transform.dtype_of(frame, ts_name))
        ts = pl.lit(ts_series)
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
        event = pl.lit(staged["event"])
    else:
        event = pl.lit(mapping.event, dtype=pl.String)
    event_reason = (
        pl.when(event.is_null() | (event == "")).then(pl.lit("missing event name"))
        if mapping.type == "track"
        else pl.lit(None, dtype=pl.String)
    )
    composites = [s for s in mapping.identifiers if s.composite is not None]
    identified = rules.identified(staged, idents, _composites(frame, composites))
    events = frame.select(
        pl.col(ROW),
        message_id=pl.lit(staged["message_id"]),
        source_id=pl.lit(ctx.source_id),
        type=pl.lit(mapping.type),
        event=event if mapping.type == "track" else pl.lit(None, dtype=pl.String),
        user_id=identified.first(USER_ID),
        anonymous_id=identified.first(ANONYMOUS_ID),
        timestamp=ts,
        received_at=pl.lit(ctx.received_at, dtype=TS),
        properties=transform.json_of(frame, mapping.properties),
        traits=transform.json_of(frame, mapping.traits),
        context=pl.lit(None, dtype=pl.String),
        sent_at=pl.lit(None, dtype=TS),
        original_timestamp=pl.lit(None, dtype=TS),
        previous_id=pl.lit(None, dtype=pl.String),
        group_id=pl.lit(None, dtype=pl.String),
    )
    reason = pl.coalesce(ts_reason, event_reason)
    return transform.finish(frame, events, identified, reason, ctx)


# The Segment fields an NDJSON chunk is projected to, under fixed names (alias, path).
_SEGMENT_TEXT: tuple[tuple[str, str], ...] = (
    ("s_type", "type"),
    ("s_event", "event"),
    ("s_name", "name"),
    ("s_message_id", "messageId"),
    ("s_timestamp", "timestamp"),
    ("s_sent_at", "sentAt"),
    ("s_user_id", "userId"),
    ("s_anonymous_id", "anonymousId"),
    ("s_previous_id", "previousId"),
    ("s_group_id", "groupId"),
    ("s_t_email", "traits.email"),
    ("s_ct_email", "context.traits.email"),
    ("s_t_phone", "traits.phone"),
    ("s_ct_phone", "context.traits.phone"),
    ("s_device_id", "context.device.id"),
)
_KIND = _trim("s_type")
# The identifiers every Segment message is read for, as (kind, SQL of the raw value).
_SEGMENT_IDENTIFIERS: tuple[tuple[str, str], ...] = (
    (USER_ID, "s_user_id"),
    (ANONYMOUS_ID, "s_anonymous_id"),
    (ANONYMOUS_ID, f"CASE WHEN {_KIND} = 'alias' THEN s_previous_id END"),
    (EMAIL, f"CASE WHEN {_KIND} <> 'group' THEN s_t_email END"),
    (EMAIL, "s_ct_email"),
    (PHONE, f"CASE WHEN {_KIND} <> 'group' THEN s_t_phone END"),
    (PHONE, "s_ct_phone"),
    (DEVICE_ID, "s_device_id"),
)


def segment(frame: pl.DataFrame, mapping: Mapping, ctx: Context, rules: SqlRules) -> LoadInput:
    """`transform.segment` with the per-row rules in SQL (same result)."""
    project: list[pl.Expr | pl.Series] = [pl.col(ROW)]
    project += [_text(frame, path).alias(alias) for alias, path in _SEGMENT_TEXT]
    extra = [spec for spec in mapping.identifiers if spec.column is not None]
    project += [
        _text(frame, spec.column).alias(f"x{i}") for i, spec in enumerate(extra) if spec.column
    ]
    needs_keys = "messageId" not in frame.columns or frame["messageId"].null_count() > 0
    columns = [
        f"{_trim('s_message_id')} AS message_id",
        f"{_KIND} AS kind",
        f"{_trim('s_event')} AS event_name",
        f"{_trim('s_name')} AS page_name",
        f"{_trim('s_user_id')} AS user_id",
        f"{_trim('s_anonymous_id')} AS anonymous_id",
        f"{_trim('s_previous_id')} AS previous_id",
        f"{_trim('s_group_id')} AS group_id",
    ]
    if needs_keys:
        project.append(transform.row_content(frame).alias("content"))
        columns[0] = f"coalesce({_trim('s_message_id')}, 'row-' || md5(content)) AS message_id"
    staged_in = frame.select(project)
    raws = [*(raw for _, raw in _SEGMENT_IDENTIFIERS), *(f"x{i}" for i in range(len(extra)))]
    kinds = [*(kind for kind, _ in _SEGMENT_IDENTIFIERS), *(spec.kind for spec in extra)]
    idents = [_Ident(kind, i) for i, kind in enumerate(kinds)]
    staged = rules.select(
        staged_in, raws, idents, columns, {"ts": "s_timestamp", "sent": "s_sent_at"}
    )

    composites = [s for s in mapping.identifiers if s.composite is not None]
    identified = rules.identified(staged, idents, _composites(frame, composites))
    traits = transform.json_column(frame, "traits")
    objects = frame.select(
        pl.col(ROW),
        traits=traits,
        context_traits=transform.json_column(frame, "context.traits"),
        properties=transform.json_column(frame, "properties"),
        context=transform.json_column(frame, "context"),
        malformed=transform.column(frame, MALFORMED).cast(pl.String),
    )
    s = pl.concat(
        [
            objects,
            staged.with_columns(
                ts=rules.timestamps(staged, "ts", staged_in["s_timestamp"]),
                sent=rules.timestamps(staged, "sent", staged_in["s_sent_at"]),
                raw_ts=staged_in["s_timestamp"],
            ),
        ],
        how="horizontal",
    )
    kind = pl.col("kind")
    events = s.select(
        ROW,
        "message_id",
        source_id=pl.lit(ctx.source_id),
        type=kind,
        event=pl.when(kind == "track")
        .then(pl.col("event_name"))
        .when(kind.is_in(["page", "screen"]))
        .then(pl.col("page_name")),
        user_id="user_id",
        anonymous_id="anonymous_id",
        timestamp="ts",
        received_at=pl.lit(ctx.received_at, dtype=TS),
        properties="properties",
        traits=pl.when(kind == "identify")
        .then(pl.coalesce("traits", "context_traits"))
        .otherwise("traits"),
        context="context",
        sent_at="sent",
        original_timestamp="ts",
        previous_id="previous_id",
        group_id="group_id",
    )
    reasons = s.select(
        pl.when(pl.col("malformed").is_not_null())
        .then(pl.col("malformed"))
        .when(~kind.is_in(sorted(MESSAGE_TYPES)) | kind.is_null())
        .then(pl.lit("unknown type"))
        .when((kind == "alias") & (pl.col("previous_id").is_null() | pl.col("user_id").is_null()))
        .then(pl.lit("alias needs previousId and userId"))
        .when((kind != "alias") & pl.col("user_id").is_null() & pl.col("anonymous_id").is_null())
        .then(pl.lit("userId or anonymousId is required"))
        .when((kind == "track") & pl.col("event_name").is_null())
        .then(pl.lit("track needs an event name"))
        .when(pl.col("raw_ts").is_null())
        .then(pl.lit("missing timestamp"))
        .when(pl.col("ts").is_null())
        .then(pl.lit("unparseable timestamp"))
    )[:, 0]
    return transform.finish(frame, events, identified, pl.lit(reasons), ctx)
