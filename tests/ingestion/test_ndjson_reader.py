"""The NDJSON reader (DuckDB, explicit Segment schema) against the Polars reader it replaced,
and the timestamp parsing against the single coalesce expression it replaced."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from cdp.db import Database
from cdp.warehouse import ROW_GROUP_ROWS, Query, Warehouse
from ingestion import queries, service, transform
from ingestion.connectors import ROW
from ingestion.imports import now_naive
from ingestion.loader import loader_for, md5_hex
from ingestion.schemas import Mapping

JsonDict = dict[str, Any]  # Any: JSON

MAPPING = Mapping.model_validate(
    {
        "identifiers": [
            {"kind": "loyalty_card", "column": "properties.loyalty_card"},
            {"kind": "name_dob", "composite": ["traits.last_name", "traits.birth_date"]},
        ],
        "custom_kinds": ["name_dob"],
    }
)

STORED: list[JsonDict] = [
    {
        "type": "track",
        "messageId": "m1",
        "userId": "u1",
        "event": "Viewed",
        "timestamp": "2026-11-01",
    },
    {
        "type": "identify",
        "messageId": "m2",
        "userId": "u2",
        "traits": {"email": "a@b.io"},
        "timestamp": "2026-11-01",
    },
]

LINES: list[JsonDict] = [
    # Already stored before this file: a duplicate.
    {
        "type": "track",
        "messageId": "m1",
        "userId": "u1",
        "event": "Viewed",
        "timestamp": "2026-11-01",
    },
    {
        "type": "identify",
        "messageId": "m3",
        "anonymousId": " a3 ",
        "timestamp": "2026-11-01T10:01:00.5+02:00",
        "sentAt": "2026-11-01T08:01:02Z",
        "context": {
            "traits": {"email": " Z@X.io ", "phone": "06 12 34 56 78"},
            "device": {"id": "dev-1", "type": "ios"},
        },
    },
    {
        "type": "identify",
        "messageId": "m4",
        "userId": "unknown",
        "anonymousId": "a4",
        "timestamp": "2026-11-01 10:00",
        "traits": {
            "email": "test@test.com",
            "phone": "0000000000",
            "last_name": "Lefèvre ",
            "birth_date": "1980-01-02",
        },
    },
    {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m5",
        "userId": "u5",
        "timestamp": "2026-11-02",
        "properties": {"loyalty_card": " C-005 ", "amount": 10.5, "items": [{"sku": "x"}]},
        "context": {"traits": {"phone": "+33 (0)6 12 34 56 79"}},
    },
    # The same message id again within the file: the first one wins.
    {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m5",
        "userId": "u5b",
        "timestamp": "2026-11-03",
    },
    {"type": "track", "messageId": "m6", "userId": "u6", "timestamp": "yesterday", "event": "E"},
    {"type": "track", "messageId": "m7", "userId": "u7", "timestamp": "2026-13-01", "event": "E"},
    {"type": "page", "messageId": "m8", "name": "Home", "timestamp": "2026-11-01T10:00:00Z"},
    {"type": "track", "messageId": "m9", "anonymousId": "a9", "timestamp": "2026-11-01"},
    {"type": "bogus", "messageId": "m10", "userId": "u10", "timestamp": "2026-11-01"},
    {
        "type": "alias",
        "messageId": "m11",
        "userId": "u11",
        "previousId": "a11",
        "timestamp": "2026-11-01",
    },
    {"type": "alias", "messageId": "m12", "userId": "u12"},
    {
        "type": "group",
        "messageId": "m13",
        "userId": "u13",
        "groupId": "g1",
        "traits": {"email": "team@corp.io", "name": "Corp"},
        "timestamp": "2026-11-01T10:00:00",
    },
    {
        "type": "identify",
        "messageId": "m14",
        "userId": "u14",
        "traits": {"phone": "0033 6 12 34 56 80", "email": "N/A"},
        "context": {"traits": {"phone": "+1 415 555 2671"}},
        "timestamp": "2026-11-01T10:00:00.123456",
    },
    {
        "type": "identify",
        "messageId": "m15",
        "userId": "u15",
        "traits": {"phone": "12"},
        "timestamp": "2026-11-01T10:00:00+05:30",
    },
    # No message id: keyed by the row's content; the two identical lines dedupe.
    {"type": "screen", "name": "Cart", "anonymousId": "a16", "timestamp": "2026-11-04"},
    {"type": "screen", "name": "Cart", "anonymousId": "a16", "timestamp": "2026-11-04"},
    {"type": "screen", "messageId": "m18", "name": "Cart", "timestamp": "2026-11-04"},
]


def _write(path: Path, lines: list[JsonDict]) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    return path


def _polars_load(warehouse: Warehouse, source_id: str, path: Path) -> None:
    """The reader this change replaced: Polars infers a struct schema over the whole file."""
    frame = (
        pl.read_ndjson(path, infer_schema_length=None)
        .with_row_index(ROW, offset=1)
        .with_columns(pl.col(ROW).cast(pl.Int64))
    )
    ctx = transform.Context(
        source_id=source_id,
        channel="file",
        region="FR",
        received_at=now_naive(),
        import_id=None,
        hasher=lambda values: md5_hex(warehouse, values),
    )
    loader_for(warehouse).load(transform.segment(frame, MAPPING, ctx))


def _without_nulls(value: object) -> object:
    """JSON with null members dropped: the struct reader filled absent keys with nulls."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _key(message_id: str | None) -> str | None:
    # Content keys hash the row as its reader sees it, so only their form is compared.
    if message_id is not None and message_id.startswith("row-"):
        return "row-"
    return message_id


def _contents(warehouse: Warehouse, source_id: str) -> dict[str, object]:
    events = [
        (
            r[0],
            _key(r[1]),
            *r[2:7],
            *(None if v is None else _without_nulls(orjson.loads(v)) for v in r[7:]),
        )
        for r in warehouse.rows(
            Query(
                "SELECT event_id, message_id, type, event, user_id, anonymous_id, timestamp,"
                " properties, traits, context FROM events WHERE source_id = $s ORDER BY event_id",
                {"s": source_id},
            )
        )
    ]
    return {
        "events": events,
        "identifiers": warehouse.rows(
            Query("SELECT event_id, kind, value FROM event_identifiers ORDER BY ALL")
        ),
        "segment_fields": warehouse.rows(Query("SELECT * FROM event_segment_fields ORDER BY ALL")),
        "rejections": [
            (r[0], _key(r[1]), r[2])
            for r in warehouse.rows(
                Query(
                    "SELECT position, message_id, reason FROM ingest_rejections"
                    " WHERE source_id = $s ORDER BY batch_id, position",
                    {"s": source_id},
                )
            )
        ],
        "counts": warehouse.rows(
            Query(
                "SELECT sum(received), sum(duplicates), sum(rejected), sum(identifiers_dropped)"
                " FROM ingest_batch_stats WHERE source_id = $s",
                {"s": source_id},
            )
        ),
    }


def test_ndjson_reader_stores_what_the_polars_reader_stored(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    stored = _write(tmp_path / "stored.ndjson", STORED)
    export = _write(tmp_path / "export.ndjson", LINES)
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http", mapping=MAPPING)
        source_id = source.id
    service.import_file(db, warehouse, source_id=source_id, path=stored, region="FR")
    run = service.import_file(db, warehouse, source_id=source_id, path=export, region="FR")
    new = _contents(warehouse, source_id)

    with Warehouse(":memory:", holder="test") as before:
        _polars_load(before, source_id, stored)
        _polars_load(before, source_id, export)
        old = _contents(before, source_id)

    # One fix: an identify whose traits are only in `context.traits` gets them as its
    # traits (as over HTTP). The struct reader lost them when other lines had `traits`
    # (Polars' coalesce of two struct encodings gave null).
    fixed = {"email": " Z@X.io ", "phone": "06 12 34 56 78"}
    events: list[tuple[object, ...]] = old["events"]  # type: ignore[assignment]
    m3 = next(i for i, e in enumerate(events) if e[1] == "m3")
    assert events[m3][8] is None
    events[m3] = (*events[m3][:8], fixed, *events[m3][9:])
    for name in new:
        assert new[name] == old[name], name
    # And the file holds what it was written to test.
    assert (run.rows_read, run.accepted, run.duplicates, run.rejected) == (18, 8, 3, 7)
    assert new["rejections"] == [
        (6, "m6", "unparseable timestamp"),
        (7, "m7", "unparseable timestamp"),
        (8, "m8", "userId or anonymousId is required"),
        (9, "m9", "track needs an event name"),
        (10, "m10", "unknown type"),
        (12, "m12", "alias needs previousId and userId"),
        (18, "m18", "userId or anonymousId is required"),
    ]
    kinds = {(r[1], r[2]) for r in new["identifiers"]}  # type: ignore[attr-defined]
    assert {
        ("phone", "+33612345678"),
        ("phone", "+33612345679"),
        ("phone", "+33612345680"),
        ("phone", "+14155552671"),
        ("email", "z@x.io"),
        ("anonymous_id", "a3"),
        ("device_id", "dev-1"),
        ("loyalty_card", "C-005"),
        ("name_dob", "lefevre|1980-01-02"),
        ("anonymous_id", "a11"),
    } <= kinds
    assert not {v for k, v in kinds if v in ("unknown", "test@test.com", "0000000000", "N/A")}
    assert ("email", "team@corp.io") not in kinds


def test_ndjson_objects_are_stored_as_sent(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    line = {
        "type": "track",
        "event": "Viewed",
        "messageId": "m1",
        "userId": "u1",
        "timestamp": "2026-11-01",
        "properties": {"price": 1, "tags": ["a"], "empty": {}},
    }
    other: JsonDict = {"type": "track", "event": "Viewed", "messageId": "m2", "userId": "u2"}
    other["timestamp"] = "2026-11-01"
    other["properties"] = {"colour": "red", "price": 2.5}
    path = _write(tmp_path / "export.ndjson", [line, other])
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
    service.import_file(db, warehouse, source_id=source.id, path=path, region="FR")
    stored = warehouse.rows(Query("SELECT properties FROM events ORDER BY event_id"))
    # Each object as it was sent: no keys of other lines, integers stay integers.
    assert [orjson.loads(r[0]) for r in stored] == [line["properties"], other["properties"]]


def test_timestamps_read_each_form_as_the_coalesce_did() -> None:
    values = [
        "2026-11-01T10:00:00Z",
        " 2026-11-01T10:00:00.5+02:00 ",
        "2026-11-01T10:00:00",
        "2026-11-01 10:00:00.123",
        "2026-11-01T10:00",
        "2026-11-01 10:00",
        "2026-11-01",
        "2026-13-01",
        "yesterday",
        "",
        None,
        "2026-11-01T10:00:00-05:00",
    ]
    frame = pl.DataFrame({ROW: range(1, len(values) + 1), "ts": values})
    expected = frame.select(transform.timestamp_expr(pl.col("ts"), pl.String()))[:, 0]
    got = transform.timestamps(frame, pl.col("ts"), pl.String())
    assert got.to_list() == expected.to_list()
    assert got.null_count() == 4


def _track(message_id: str | None, user: str) -> bytes:
    message: JsonDict = {"type": "track", "userId": user, "event": "Viewed"}
    message["timestamp"] = "2026-11-01T10:00:00Z"
    if message_id is not None:
        message["messageId"] = message_id
    return orjson.dumps(message)


BROKEN_LINES = [
    _track("g1", "u1"),  # line 1
    b"",  # 2: blank, skipped
    b'{"type": broken',  # 3: malformed
    _track("g2", "u2"),  # 4
    b"[1, 2]",  # 5: JSON, not an object
    _track(None, "u3"),  # 6: no messageId, keyed by its content
    b'{"type": "track", "userId": "u4", "event": "Viewed", "timestamp": "yesterday"}',  # 7
    _track("g5", "u5"),  # 8, without a final newline
]


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])
def test_malformed_ndjson_lines_are_rejected_by_line_and_the_rest_loads(
    db: Database, warehouse: Warehouse, tmp_path: Path, chunk_rows: int
) -> None:
    path = tmp_path / "broken.ndjson"
    path.write_bytes(b"\n".join(BROKEN_LINES))
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
    run = service.import_file(
        db, warehouse, source_id=source.id, path=path, region="FR", chunk_rows=chunk_rows
    )
    assert (run.status, run.accepted, run.rejected) == ("succeeded", 4, 3)
    rejections = warehouse.rows(
        Query(
            "SELECT position, reason FROM ingest_rejections WHERE source_id = $s ORDER BY position",
            {"s": source.id},
        )
    )
    assert [position for position, _ in rejections] == [3, 5, 7]
    assert rejections[0][1].startswith("malformed JSON")
    assert rejections[1][1] == "malformed JSON: not an object"
    assert rejections[2][1] == "unparseable timestamp"
    users = warehouse.rows(
        Query("SELECT user_id FROM events WHERE source_id = $s ORDER BY user_id", {"s": source.id})
    )
    assert [u for (u,) in users] == ["u1", "u2", "u3", "u5"]


def test_a_fixed_file_reimported_after_malformed_lines_adds_only_what_was_rejected(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.ndjson"
    broken.write_bytes(b"\n".join(BROKEN_LINES))
    fixed = tmp_path / "fixed.ndjson"
    fixed.write_bytes(
        b"\n".join(
            line if n != 3 else _track("g3", "u3b") for n, line in enumerate(BROKEN_LINES, 1)
        )
    )
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
    service.import_file(db, warehouse, source_id=source.id, path=broken, region="FR")
    run = service.import_file(db, warehouse, source_id=source.id, path=fixed, region="FR")
    # Rows keyed by content (line 6) and by messageId dedupe against the first import.
    assert (run.accepted, run.rejected) == (1, 2)
    count = warehouse.rows(
        Query("SELECT count(*) FROM events WHERE source_id = $s", {"s": source.id})
    )
    assert count == [(5,)]


def test_a_malformed_line_deep_in_a_large_file_loses_and_repeats_nothing(
    db: Database, warehouse: Warehouse, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB hands out records before it meets the bad line: those are kept, and the line
    by line pass starts right after them (no record lost, none loaded twice)."""
    good = 200_000  # 17 MB: DuckDB hands out some 120k records before it meets the bad line
    lines = [_track(None, f"u{n}") for n in range(good)]  # no messageId: keyed by content
    lines.insert(199_900, b'{"type": broken')
    path = tmp_path / "large.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
    with caplog.at_level(logging.WARNING, logger="ingestion.connectors.files"):
        run = service.import_file(
            db, warehouse, source_id=source.id, path=path, region="FR", chunk_rows=5_000
        )
    assert (run.accepted, run.rejected, run.duplicates) == (good, 1, 0)
    (stored,) = warehouse.rows(
        Query(
            "SELECT count(*), count(DISTINCT user_id) FROM events WHERE source_id = $s",
            {"s": source.id},
        )
    )
    assert stored == (good, good)
    position = warehouse.rows(
        Query("SELECT position FROM ingest_rejections WHERE source_id = $s", {"s": source.id})
    )
    assert position == [(199_901,)]
    (warning,) = [r.getMessage() for r in caplog.records if "after record" in r.getMessage()]
    handed_out = int(warning.split("after record ")[1].split(";")[0])
    assert 0 < handed_out < 199_900  # the case under test: records were handed out first


# The reader's query before objects were parsed once per line (json_type and one `->>`
# per path): the reference for `queries.segment_lines`.
_PATH_BY_PATH = """
SELECT * REPLACE (
        CASE WHEN json_type(traits) = 'OBJECT' THEN traits::VARCHAR END AS traits,
        CASE WHEN json_type(context) = 'OBJECT' THEN context::VARCHAR END AS context,
        CASE WHEN json_type(properties) = 'OBJECT' THEN properties::VARCHAR END
            AS properties),
    traits->>'$.email' AS "traits.email",
    traits->>'$.phone' AS "traits.phone",
    CASE WHEN json_type(context, '$.traits') = 'OBJECT'
        THEN (context->'$.traits')::VARCHAR END AS "context.traits",
    context->>'$.traits.email' AS "context.traits.email",
    context->>'$.traits.phone' AS "context.traits.phone",
    context->>'$.device.id' AS "context.device.id"
FROM read_json($path, format = 'newline_delimited', columns = $columns)
"""

ODD_OBJECTS: list[JsonDict] = [
    {"type": "track", "traits": "{not an object", "context": "{x"},
    {"type": "track", "traits": ["a"], "context": {"traits": "{still a string"}},
    {"type": "track", "traits": 12, "context": {"traits": ["x"], "device": {"id": 42}}},
    {"type": "track", "traits": None, "context": None, "properties": None},
    {"type": "track", "traits": {}, "context": {"traits": {}, "device": {}}},
    {"type": "track", "traits": {"email": 5, "phone": None}, "context": {"device": "d"}},
    {
        "type": "track",
        "traits": {"email": {"a": 1}, "phone": [1, 2]},
        "context": {"traits": {"email": " E@x.io ", "phone": 33612345678}, "device": {"id": ""}},
        "properties": {"nested": {"k": [1, 2.5, "x"]}},
    },
    {"type": "track", "traits": {"email": "é@x.fr", "phone": "+33 6 12"}, "properties": "{"},
    {"type": "track", "context": {"traits": {"email": None}, "device": {"id": None}}},
]


def test_segment_lines_parse_objects_once_and_read_what_path_by_path_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / "odd.ndjson"
    # Spaces inside the lines: the JSON text DuckDB hands out is its own (minified).
    path.write_bytes(b"\n".join(orjson.dumps(line).replace(b":", b": ") for line in ODD_OBJECTS))
    query = queries.segment_lines(str(path), dict(queries.SEGMENT_COLUMNS))
    with Warehouse(":memory:", holder="test") as scratch:
        new = scratch.run(query)
        old = scratch.run(Query(_PATH_BY_PATH, query.params))
    assert new.columns == old.columns
    assert new.rows() == old.rows()
    assert new["context.traits"].to_list()[1] is None  # a string that starts with `{`
    assert new["context.device.id"].to_list()[2] == "42"


def test_a_large_import_leaves_no_partial_row_group_but_the_last(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    """Each chunk is whole row groups: a partial one per chunk would stay in the table until a
    checkpoint rewrote it (seconds per checkpoint on a large import)."""
    lines = 2 * ROW_GROUP_ROWS + 1_000  # one default chunk, then a small one
    path = tmp_path / "large.ndjson"
    path.write_bytes(b"\n".join(_track(f"r{n}", f"u{n % 5000}") for n in range(lines)) + b"\n")
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
    run = service.import_file(db, warehouse, source_id=source.id, path=path, region="FR")
    assert run.accepted == lines
    groups = warehouse.rows(
        Query(
            "SELECT row_group_id, sum(count) FROM pragma_storage_info('events')"
            " WHERE column_path = '[0]' GROUP BY row_group_id ORDER BY row_group_id"
        )
    )
    assert [rows for _, rows in groups] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 1_000]
