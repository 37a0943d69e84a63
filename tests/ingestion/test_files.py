"""The file connector: CSV, Parquet and NDJSON imports, bad rows, no-op re-imports, uploads."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cdp import migrate
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from ingestion import imports, service, transform
from ingestion.connectors import files
from ingestion.errors import InvalidMapping, UnsupportedFile
from ingestion.imports import read_ahead
from ingestion.loader import LoadInput, empty_events, empty_identifiers
from ingestion.models import ImportRun
from ingestion.schemas import Mapping
from tests.cdp.test_cli import cdp
from tests.ingestion.conftest import basic, create_source, drained

JsonDict = dict[str, Any]  # Any: JSON

CRM_MAPPING: JsonDict = {
    "type": "identify",
    "timestamp": "updated_at",
    "message_id": "customer_id",
    "identifiers": [
        {"kind": "user_id", "column": "customer_id"},
        {"kind": "email", "column": "email"},
        {"kind": "phone", "column": "phone"},
        {"kind": "name_dob", "composite": ["last_name", "birth_date"]},
    ],
    "traits": ["first_name", "last_name"],
}

CSV = """customer_id,email,phone,first_name,last_name,birth_date,updated_at
c1, Ann@Example.com ,06 12 34 56 78,Ann,Lefèvre,1980-01-02,2026-11-01T10:00:00Z
c2,bob@example.com,,Bob,Martin,1975-05-06,2026-11-02 09:30:00
c3,carl@example.com,,Carl,Petit,,not a date
,,,,Nobody,,2026-11-03
c4,test@test.com,0000000000,Dan,Roux,1990-09-09,2026-11-04
"""


def _file_source(db: Database, name: str, mapping: JsonDict) -> str:
    """A `file` source with this mapping; returns its id."""
    with db.begin() as session:
        source, _ = service.create_source(
            session, name=name, kind="file", mapping=Mapping.model_validate(mapping)
        )
        return source.id


def _only_import(db: Database, source_id: str) -> ImportRun:
    """The one import record of a source."""
    with db.begin() as session:
        (run,) = session.scalars(select(ImportRun).where(ImportRun.source_id == source_id))
        return run


def _crm(db: Database) -> str:
    return _file_source(db, "crm", CRM_MAPPING)


def test_csv_import_loads_good_rows_and_reports_bad_ones_by_row(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _crm(db)
    path = tmp_path / "crm.csv"
    path.write_text(CSV)
    run = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    assert (run.status, run.rows_read, run.accepted, run.rejected) == ("succeeded", 5, 3, 2)
    assert run.identifiers_dropped == 2  # c4's placeholder email and phone
    assert run.duration_ms is not None
    rejected = warehouse.rows(
        Query("SELECT position, reason FROM ingest_rejections ORDER BY position")
    )
    assert rejected[0][0] == 3
    assert rejected[0][1].startswith("unparseable timestamp")
    assert rejected[1] == (4, "missing identifier")
    ids = warehouse.rows(
        Query(
            "SELECT e.message_id, i.kind, i.value FROM event_identifiers i"
            " JOIN events e USING (event_id) ORDER BY e.event_id, i.kind"
        )
    )
    assert ("c1", "email", "ann@example.com") in ids
    assert ("c1", "phone", "+33612345678") in ids
    assert ("c1", "name_dob", "lefevre|1980-01-02") in ids
    assert ("c4", "user_id", "c4") in ids
    assert not [i for i in ids if i[0] == "c4" and i[1] in ("email", "phone")]
    first = warehouse.rows(
        Query("SELECT user_id, timestamp, traits FROM events WHERE message_id = 'c1'")
    )[0]
    assert first[0] == "c1"
    assert first[1] == datetime(2026, 11, 1, 10, 0)
    assert orjson.loads(first[2]) == {"first_name": "Ann", "last_name": "Lefèvre"}


def test_reimporting_the_same_content_is_a_no_op(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _crm(db)
    path = tmp_path / "crm.csv"
    path.write_text(CSV)
    service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    copy = tmp_path / "copy.csv"
    copy.write_text(CSV)
    again = service.import_file(db, warehouse, source_id=source_id, path=copy, region="FR")
    assert again.skipped
    assert again.status == "skipped"
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 3
    # Different content that repeats records: those rows dedupe by their message id.
    overlap = tmp_path / "overlap.csv"
    overlap.write_text(CSV + "c5,eve@example.com,,Eve,Blanc,1999-01-01,2026-11-05\n")
    third = service.import_file(db, warehouse, source_id=source_id, path=overlap, region="FR")
    assert (third.accepted, third.duplicates, third.rejected) == (1, 3, 2)


def test_parquet_import_with_typed_columns_and_row_hash_ids(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _file_source(
        db,
        "tills",
        {
            "event": "Purchase",
            "timestamp": "ts",
            "identifiers": [{"kind": "loyalty_card", "column": "card"}],
            "properties": ["amount", "store"],
        },
    )
    frame = pl.DataFrame(
        {
            "card": ["K1", "K2", None, "K1"],
            "amount": [10.5, 3.0, 1.0, 10.5],
            "store": [1, 2, 3, 1],
            "ts": [
                datetime(2026, 11, 1, 12),
                datetime(2026, 11, 2),
                datetime(2026, 11, 3),
                datetime(2026, 11, 1, 12),
            ],
        }
    )
    path = tmp_path / "tills.parquet"
    frame.write_parquet(path)
    run = service.import_file(
        db, warehouse, source_id=source_id, path=path, region="FR", chunk_rows=2
    )
    # row 3 has no card; row 4 repeats row 1 exactly, so its content hash dedupes it
    assert (run.rows_read, run.accepted, run.rejected, run.duplicates) == (4, 2, 1, 1)
    events = warehouse.rows(
        Query("SELECT event, properties->>'$.amount', message_id FROM events ORDER BY event_id")
    )
    assert [e[:2] for e in events] == [("Purchase", "10.5"), ("Purchase", "3.0")]
    assert all(e[2].startswith("row-") for e in events)


def test_ndjson_lines_dedupe_against_messages_sent_over_http(
    client: TestClient,
    data_headers: dict[str, str],
    db: Database,
    warehouse: Warehouse,
    tmp_path: Path,
) -> None:
    web = create_source(client, data_headers, name="web", kind="http")
    sent = {"type": "track", "messageId": "m1", "userId": "u1", "event": "Viewed"}
    assert (
        client.post(
            "/v1/batch", json={"batch": [sent]}, headers=basic(web["write_key"])
        ).status_code
        == 200
    )
    drained(client)
    # A Segment export of the same source's messages, imported through the file path.
    lines = [
        {**sent, "timestamp": "2026-11-01T10:00:00Z"},
        {
            "type": "identify",
            "messageId": "m2",
            "anonymousId": "a1",
            "context": {"traits": {"email": "Z@X.io"}},
            "timestamp": "2026-11-01T10:01:00.5+02:00",
        },
        {"type": "track", "messageId": "m3", "userId": "u1", "timestamp": "2026-11-01"},
        {"type": "bogus", "messageId": "m4", "userId": "u1", "timestamp": "2026-11-01"},
    ]
    path = tmp_path / "export.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines))
    run = service.import_file(db, warehouse, source_id=web["id"], path=path, region="FR")
    assert (run.accepted, run.duplicates, run.rejected) == (1, 1, 2)
    reasons = warehouse.rows(
        Query(
            "SELECT position, reason FROM ingest_rejections WHERE import_id = $i ORDER BY position",
            {"i": run.id},
        )
    )
    assert reasons == [(3, "track needs an event name"), (4, "unknown type")]
    m2 = warehouse.rows(
        Query(
            "SELECT e.timestamp, e.traits, i.kind, i.value FROM events e"
            " JOIN event_identifiers i USING (event_id) WHERE e.message_id = 'm2' ORDER BY i.kind"
        )
    )
    assert m2[0][0] == datetime(2026, 11, 1, 8, 1, 0, 500000)
    assert orjson.loads(m2[0][1]) == {"email": "Z@X.io"}
    assert [(r[2], r[3]) for r in m2] == [("anonymous_id", "a1"), ("email", "z@x.io")]


def test_file_missing_mapped_columns_is_refused_and_columns_are_remembered(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _crm(db)
    bad = tmp_path / "bad.csv"
    bad.write_text("customer_id,updated_at\nc1,2026-11-01\n")
    with pytest.raises(InvalidMapping, match="lacks mapped columns"):
        service.import_file(db, warehouse, source_id=source_id, path=bad, region="FR")
    good = tmp_path / "crm.csv"
    good.write_text(CSV)
    service.import_file(db, warehouse, source_id=source_id, path=good, region="FR")
    with db.begin() as session:
        assert service.get_source(session, source_id=source_id).columns == CSV.splitlines()[
            0
        ].split(",")
        wrong = Mapping.model_validate({**CRM_MAPPING, "traits": ["shoe_size"]})
        with pytest.raises(InvalidMapping, match="shoe_size"):
            service.update_source(session, source_id=source_id, mapping=wrong)


def test_cli_ingest_imports_globs_into_a_source(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cdp.sqlite3'}"
    migrate.upgrade(url)
    database = Database(url)
    try:
        _crm(database)
    finally:
        database.dispose()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text(CSV)
    result = cdp(tmp_path, "ingest", "crm", str(tmp_path / "in" / "*.csv"))
    assert result.returncode == 0, result.stderr
    assert "a.csv: succeeded, 5 rows read, 3 accepted, 2 rejected" in result.stdout
    missing = cdp(tmp_path, "ingest", "crm", str(tmp_path / "nope.csv"))
    assert missing.returncode == 1
    assert "no such file" in missing.stderr


class _ThreeThenBroken:
    """A connector whose file breaks after three chunks."""

    name = "broken"

    def chunks(self) -> Iterator[pl.DataFrame]:
        for i in range(3):
            yield pl.DataFrame({"_row": [i]})
        raise UnsupportedFile("broken: cannot read the file")


def _numbered(frame: pl.DataFrame) -> LoadInput:
    """A stand-in transform that names each load after its chunk."""
    return LoadInput(
        channel=str(frame["_row"][0]), events=empty_events(), identifiers=empty_identifiers()
    )


def test_read_ahead_keeps_chunk_order_and_raises_the_readers_error_in_turn() -> None:
    seen: list[str] = []

    def consume() -> None:
        for _chunk, data in read_ahead(_ThreeThenBroken(), _numbered):
            seen.append(data.channel)

    with pytest.raises(UnsupportedFile, match="cannot read"):
        consume()
    assert seen == ["0", "1", "2"]
    # A consumer that stops early stops the reader too (the generator joins its thread).
    reader = read_ahead(_ThreeThenBroken(), _numbered)
    assert next(reader)[1].channel == "0"
    reader.close()


@pytest.mark.parametrize(("checkpoint_rows", "wal_left"), [(0, True), (2, False)])
def test_long_imports_checkpoint_the_warehouse_as_they_go(
    db: Database,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    checkpoint_rows: int,
    wal_left: bool,
) -> None:
    """Appends reach the WAL; a checkpoint every `CHECKPOINT_ROWS` rows empties it, so the
    warehouse's close has nothing left to checkpoint."""
    monkeypatch.setattr(imports, "CHECKPOINT_ROWS", checkpoint_rows)
    path = tmp_path / "crm.csv"
    rows = [
        f"c{n},c{n}@example.com,,Ann,Lee,2026-11-0{1 + n % 9}T10:00:00Z,Lee,1980-01-02"
        for n in range(6)
    ]
    header = "customer_id,email,phone,first_name,last_name,updated_at,last,birth_date"
    path.write_text("\n".join([header, *rows]) + "\n")
    mapping = {**CRM_MAPPING, "identifiers": CRM_MAPPING["identifiers"][:2]}
    with Warehouse(tmp_path / "w.duckdb", holder="test") as warehouse:
        with db.begin() as session:
            source, _ = service.create_source(
                session, name="crm", kind="file", mapping=Mapping.model_validate(mapping)
            )
        run = service.import_file(
            db, warehouse, source_id=source.id, path=path, region="FR", chunk_rows=2
        )
        assert (run.status, run.accepted) == ("succeeded", 6)
        wal = tmp_path / "w.duckdb.wal"
        assert (wal.exists() and wal.stat().st_size > 0) == wal_left


def test_mapped_columns_of_every_type_are_stored_as_valid_json(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    """The loader stores the JSON columns without parsing them again, so what the mapping
    writes must be valid JSON whatever the file's column types (bytes as base64 text)."""
    columns: dict[str, pl.Series] = {
        "text": pl.Series(['quote " back \\ line \n ctl \x01 sep \u2028', None]),
        "binary": pl.Series([b"\x00\xff", None]),
        "float": pl.Series([float("nan"), float("inf")]),
        "big": pl.Series([2**64 - 1, 0], dtype=pl.UInt64),
        "amount": pl.Series([Decimal("1.25"), None]),
        "day": pl.Series([date(2026, 1, 2), None]),
        "at": pl.Series([datetime(2026, 1, 2, 3, tzinfo=UTC), None]),
        "tags": pl.Series([["a", "b"], []]),
        "nested": pl.Series([{"x": 1, "y": "z"}, None]),
        "kind": pl.Series(["a", "b"], dtype=pl.Categorical),
    }
    frame = pl.DataFrame({"card": ["K1", "K2"], "ts": [datetime(2026, 11, 1)] * 2, **columns})
    path = tmp_path / "typed.parquet"
    frame.write_parquet(path)
    source_id = _file_source(
        db,
        "typed",
        {
            "event": "Typed",
            "timestamp": "ts",
            "identifiers": [{"kind": "loyalty_card", "column": "card"}],
            "properties": list(columns),
            "traits": ["binary", "text"],
        },
    )
    run = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    assert (run.status, run.accepted) == ("succeeded", 2)
    stored = warehouse.rows(
        Query(
            "SELECT properties::VARCHAR, traits::VARCHAR, json_valid(properties),"
            " json_valid(traits), properties->>'$.binary', message_id"
            " FROM events ORDER BY properties->>'$.kind'"
        )
    )
    assert [row[2:5] for row in stored] == [(True, True, "AP8="), (True, True, None)]
    first = orjson.loads(stored[0][0])
    assert first["text"] == columns["text"][0]
    assert (first["float"], first["big"], first["tags"]) == (None, 2**64 - 1, ["a", "b"])
    assert orjson.loads(stored[0][1]) == {"binary": "AP8=", "text": columns["text"][0]}
    assert all(row[5].startswith("row-") for row in stored)  # content keys read bytes too


class _Panic(BaseException):
    """Stands for pyo3's PanicException: a library's panic is not an `Exception`."""


def test_an_import_stopped_by_a_panic_is_recorded_as_failed(
    db: Database, warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def panic(frame: pl.DataFrame, mapping: Mapping, ctx: object) -> LoadInput:
        raise _Panic("not yet implemented")

    monkeypatch.setattr(transform, "mapped", panic)
    path = tmp_path / "crm.csv"
    path.write_text(CSV)
    source_id = _crm(db)
    with pytest.raises(_Panic):
        service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    run = _only_import(db, source_id)
    assert (run.status, run.error) == ("failed", "_Panic: not yet implemented")


def _large_crm(path: Path, rows: int, *, middle: str = "Lee") -> None:
    """A CRM file of a few MiB whose middle row's last name is `middle`."""
    header = "customer_id,email,phone,first_name,last_name,birth_date,updated_at"
    lines = [
        f"c{n},c{n}@example.com,,Ann,{middle if n == rows // 2 else 'Lee'},1980-01-02,"
        "2026-11-01T10:00:00Z"
        for n in range(rows)
    ]
    path.write_text("\n".join([header, *lines]) + "\n")


def test_a_new_file_is_hashed_beside_its_import_and_its_hash_recorded(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _crm(db)
    path = tmp_path / "crm.csv"
    _large_crm(path, 60_000)
    assert path.stat().st_size > 3 * files.PROBE_BYTES
    run = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    assert (run.status, run.accepted) == ("succeeded", 60_000)
    digest, rows = files.hash_and_count(path, "csv")
    assert (run.content_hash, run.rows_total, run.content_probe) == (
        digest,
        rows,
        files.content_probe(path),
    )
    # Its copy is recognised by the hash recorded at the end of that first import.
    copy = tmp_path / "copy.csv"
    copy.write_bytes(path.read_bytes())
    again = service.import_file(db, warehouse, source_id=source_id, path=copy, region="FR")
    assert again.status == "skipped"


def test_a_file_differing_only_inside_its_probe_is_imported(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    """Same size, first and last MiB as an earlier file: the full hash decides."""
    source_id = _crm(db)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    _large_crm(first, 60_000)
    _large_crm(second, 60_000, middle="Lea")
    assert files.content_probe(first) == files.content_probe(second)
    service.import_file(db, warehouse, source_id=source_id, path=first, region="FR")
    run = service.import_file(db, warehouse, source_id=source_id, path=second, region="FR")
    # Read again (its rows dedupe by customer id), not skipped as the same content.
    assert (run.status, run.skipped, run.rows_read) == ("succeeded", False, 60_000)
    assert run.content_hash != files.hash_and_count(first, "csv")[0]


def test_imports_recorded_before_probes_are_still_compared_by_hash(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _crm(db)
    path = tmp_path / "crm.csv"
    path.write_text(CSV)
    first = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    with db.begin() as session:
        recorded = session.get(ImportRun, first.id)
        assert recorded is not None
        recorded.content_probe = None  # as written before migration 0011
    again = service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    assert again.status == "skipped"


def test_a_nested_identifier_column_is_refused_with_a_clear_error(
    db: Database, warehouse: Warehouse, tmp_path: Path
) -> None:
    source_id = _file_source(
        db,
        "nested",
        {
            "event": "E",
            "timestamp": "ts",
            "identifiers": [{"kind": "user_id", "column": "u"}, {"kind": "email", "column": "e"}],
        },
    )
    path = tmp_path / "nested.parquet"
    pl.DataFrame(
        {"u": [["a"], ["b"]], "e": ["a@b.io", "c@d.io"], "ts": [datetime(2026, 1, 1)] * 2}
    ).write_parquet(path)
    with pytest.raises(InvalidMapping, match=r"not lists or structs: u \(List\(String\)\)"):
        service.import_file(db, warehouse, source_id=source_id, path=path, region="FR")
    assert _only_import(db, source_id).status == "failed"
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 0
