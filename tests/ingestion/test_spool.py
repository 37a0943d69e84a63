"""The tracking spool: records survive a crash, are replayed once, and torn tails are cut."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cdp.app import create_app
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from ingestion import service
from ingestion.drainer import Drainer
from ingestion.loader import LoadInput, concat_loads, loader_for
from ingestion.runtime import spool_dir
from ingestion.spool import Spool, decode, encode
from ingestion.tracking import SourceInfo, parse_messages
from ingestion.writer import combine

NOW = datetime(2026, 11, 25, 10, 0)


def _load(source_id: str, ids: list[str], *, bad: int = 0) -> LoadInput:
    """What the writer spools for one request of these message ids (plus `bad` rejects)."""
    batch: list[Any] = [  # Any: JSON
        {
            "type": "identify",
            "messageId": m,
            "userId": f"u-{m}",
            "traits": {"email": f"{m}@x.io", "phone": "0000000000"},
        }
        for m in ids
    ]
    batch += [{"type": "track", "messageId": f"bad-{i}", "event": "E"} for i in range(bad)]
    parsed = parse_messages(
        {"batch": batch},
        batch,
        source=SourceInfo(id=source_id, enabled=True),
        received_at=NOW,
        region="FR",
        check_sizes=False,
    )
    return combine([(source_id, parsed, NOW)])


def _drainer(warehouse: Warehouse, directory: Path) -> Drainer:
    return Drainer(loader_for(warehouse), Spool(directory), interval_s=0, max_events=1000)


def _message_ids(warehouse: Warehouse) -> list[str]:
    rows = warehouse.rows(Query("SELECT message_id FROM events ORDER BY event_id"))
    return [r[0] for r in rows]


def _stats(warehouse: Warehouse, source_id: str) -> tuple[int, ...]:
    row = warehouse.rows(
        Query(
            "SELECT sum(s.received), sum(b.events), sum(s.duplicates), sum(s.rejected),"
            " sum(s.identifiers_dropped)"
            " FROM ingest_batches b JOIN ingest_batch_stats s USING (batch_id)"
            " WHERE b.source_id = $s",
            {"s": source_id},
        )
    )[0]
    return tuple(int(v) for v in row)


def test_a_record_round_trips_through_its_encoding() -> None:
    data = _load("s", ["a", "b"], bad=1)
    back = decode(encode(data))
    assert back.events.equals(data.events)
    assert back.identifiers.equals(data.identifiers)
    assert back.rejections.equals(data.rejections)
    assert back.dropped == data.dropped == {"s": 2}
    assert back.channel == "http"


def test_records_spooled_before_a_crash_are_loaded_on_start(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    assert list(spool.open(0)) == []
    assert [spool.append(_load("s", [f"m{i}"], bad=i % 2)) for i in range(3)] == [1, 2, 3]
    # The process dies here: nothing was loaded, the segment stays on disk.
    drainer = _drainer(warehouse, tmp_path)
    assert drainer.replay() == 4
    assert _message_ids(warehouse) == ["m0", "m1", "m2"]
    assert loader_for(warehouse).spool_mark() == 3
    assert drainer.spool.files() == []
    assert _stats(warehouse, "s") == (4, 3, 0, 1, 3)
    # Sequence numbers go on from the mark, so later records sort after these.
    assert drainer.spool.append(_load("s", ["m3"])) == 4


def test_replay_starts_after_the_last_loaded_record(warehouse: Warehouse, tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    list(spool.open(0))
    loads = [_load("s", [f"m{i}"]) for i in range(3)]
    for load in loads:
        spool.append(load)
    # The first two records were loaded (and the mark stored with them) before the crash.
    loader_for(warehouse).load(concat_loads(loads[:2], spool_lsn=2))
    drainer = _drainer(warehouse, tmp_path)
    assert drainer.replay() == 1
    assert _message_ids(warehouse) == ["m0", "m1", "m2"]
    # Nothing was loaded twice, so nothing counts as a duplicate.
    assert _stats(warehouse, "s") == (3, 3, 0, 0, 3)


def test_a_replay_without_the_mark_is_still_deduplicated(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    list(spool.open(0))
    load = _load("s", ["m0", "m1"])
    spool.append(load)
    loader_for(warehouse).load(load)  # loaded, but its mark was never stored
    _drainer(warehouse, tmp_path).replay()
    assert _message_ids(warehouse) == ["m0", "m1"]
    assert _stats(warehouse, "s")[:3] == (4, 2, 2)


def test_a_torn_tail_is_cut_off_and_the_records_before_it_load(
    warehouse: Warehouse, tmp_path: Path
) -> None:
    spool = Spool(tmp_path)
    list(spool.open(0))
    spool.append(_load("s", ["m0"]))
    spool.append(_load("s", ["m1"]))
    spool.close(0)
    [segment] = spool.files()
    torn = _load("s", ["never-acknowledged"])
    with segment.open("ab") as handle:  # a write cut short by the crash, never fsynced
        handle.write(b"CDPS" + encode(torn)[:50])
    drainer = _drainer(warehouse, tmp_path)
    assert drainer.replay() == 2
    assert _message_ids(warehouse) == ["m0", "m1"]
    assert drainer.spool.files() == []
    # A second segment with a corrupt record in the middle: only what precedes it loads.
    spool = drainer.spool
    spool.append(_load("s", ["m2"]))
    spool.append(_load("s", ["m3"]))
    spool.close(2)
    [segment] = spool.files()
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert _drainer(warehouse, tmp_path).replay() == 1
    assert _message_ids(warehouse) == ["m0", "m1", "m2"]


def test_the_app_loads_a_left_over_spool_before_it_serves(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    with db.begin() as session:
        source, _ = service.create_source(session, name="web", kind="http")
        source_id = source.id
    spool = Spool(spool_dir(settings))
    list(spool.open(0))
    spool.append(_load(source_id, ["m0", "m1"], bad=1))
    spool.append(_load(source_id, ["m1", "m2"]))  # m1 resent: a duplicate, counted once
    app = create_app(settings, db=db, start_scheduler=False)
    warehouse = app.state.warehouse
    with TestClient(app):
        # Loaded during startup, before the first request could be served.
        assert _message_ids(warehouse) == ["m0", "m1", "m2"]
        assert spool.files() == []
        assert _stats(warehouse, source_id) == (5, 3, 1, 1, 4)


def test_a_clean_stop_loads_everything_and_leaves_no_segment(
    settings: Settings, db: Database
) -> None:
    with db.begin() as session:
        _, key = service.create_source(session, name="web", kind="http")
    assert key is not None
    big = settings.model_copy(
        update={"ingestion": settings.ingestion.model_copy(update={"drain_interval_ms": 60_000})}
    )
    app = create_app(big, db=db, start_scheduler=False)
    warehouse_path = big.warehouse_file
    with TestClient(app) as client:
        for i in range(3):
            body = {"batch": [{"type": "track", "messageId": f"m{i}", "userId": "u", "event": "E"}]}
            assert client.post("/v1/batch", json=body, auth=(key, "")).status_code == 200
        # Drained once a minute: the events are only in the spool for now.
        assert Spool(spool_dir(big)).files()
    assert Spool(spool_dir(big)).files() == []
    with Warehouse(warehouse_path) as warehouse:
        assert _message_ids(warehouse) == ["m0", "m1", "m2"]


def test_spool_dir_defaults_beside_the_warehouse(settings: Settings) -> None:
    assert spool_dir(settings) == settings.warehouse_file.with_name("warehouse.duckdb.spool")
    moved = settings.model_copy(
        update={"ingestion": settings.ingestion.model_copy(update={"spool_dir": Path("/x")})}
    )
    assert spool_dir(moved) == Path("/x")


def test_a_failed_fsync_is_not_acknowledged_and_the_spool_goes_on(
    warehouse: Warehouse, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    list(spool.open(0))
    assert spool.append(_load("s", ["m0"])) == 1

    def broken_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fdatasync", broken_disk)
        with pytest.raises(OSError, match="Input/output"):
            spool.append(_load("s", ["m1"]))
    assert spool.last_lsn == 1  # waiting for lsn 1 is waiting for everything acknowledged
    assert spool.append(_load("s", ["m2"])) == 3
    spool.close(0)
    assert len(spool.files()) == 2
    # The unacknowledged record was written whole: a replay loads it (at least once; a
    # client resending it after the 500 is deduplicated).
    _drainer(warehouse, tmp_path).replay()
    assert _message_ids(warehouse) == ["m0", "m1", "m2"]
