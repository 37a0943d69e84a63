"""Operational row ids."""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path

from sqlalchemy import event

from cdp.db import Database, new_id, new_ids, uuid_text


def test_new_ids_are_uuid7_that_carry_their_creation_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(2000)]
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    assert [str(p) for p in parsed] == ids
    stamps = [p.int >> 80 for p in parsed]
    assert all(before <= s <= after for s in stamps)
    # Created one after the other, their instants never go back (a B-tree append).
    assert stamps == sorted(stamps)
    assert len(set(ids)) == len(ids)


def test_new_ids_of_a_batch_are_distinct_uuid7_of_the_current_millisecond() -> None:
    """A batch's ids come from one draw of system randomness (a real-time batch made a
    system call, and handed the GIL over, per id): still UUIDv7, unique, unguessable."""
    before = time.time_ns() // 1_000_000
    ids = new_ids(5000) + new_ids(5000)
    after = time.time_ns() // 1_000_000
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and p.variant == uuid.RFC_4122 for p in parsed)
    assert [str(p) for p in parsed] == ids
    assert all(before <= p.int >> 80 <= after for p in parsed)
    assert len(set(ids)) == len(ids)
    # The 74 random bits vary over all their positions (none stuck at 0 or 1).
    random_bits = [(p.int >> 64 & 0xFFF) << 62 | p.int & ((1 << 62) - 1) for p in parsed]
    either = 0
    both = (1 << 74) - 1
    for bits in random_bits:
        either |= bits
        both &= bits
    assert either == (1 << 74) - 1
    assert both == 0
    assert new_ids(0) == []


def test_uuid_text_is_the_canonical_form() -> None:
    for n in (0, 1, 2**128 - 1, uuid.UUID(new_id()).int, 0x0123456789ABCDEF0123456789ABCDEF):
        assert uuid_text(n) == str(uuid.UUID(int=n))


def test_wal_checkpoint_truncates_the_log_and_gives_up_quickly_while_a_reader_holds_it(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    wal = tmp_path / "store.sqlite3-wal"
    try:
        with db.engine.begin() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        # A reader keeps an old snapshot while more writes arrive: the log cannot be copied
        # whole, and the checkpoint says so instead of waiting the store's 30 s for it.
        reader = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM t").fetchone()
        with db.engine.begin() as connection:
            connection.exec_driver_sql(
                "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n"
                " WHERE x < 5000) INSERT INTO t SELECT x FROM n"
            )
        held = db.checkpoint_wal(busy_ms=50)
        assert held is not None
        assert held.busy
        assert wal.stat().st_size > 0
        reader.execute("COMMIT")
        reader.close()
        done = db.checkpoint_wal()
        assert done is not None
        assert not done.busy
        assert wal.stat().st_size == 0  # truncated: the log starts again from nothing
        with db.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar_one() == 5000
    finally:
        db.dispose()


def test_wal_checkpoint_is_sqlite_only() -> None:
    db = Database("sqlite://")
    try:
        assert db.checkpoint_wal() is None
    finally:
        db.dispose()


def test_sqlite_pool_keeps_the_connections_a_burst_opened(tmp_path: Path) -> None:
    """Connections a burst of concurrent requests opened stay open for the next burst:
    not opened again, each with its pragmas."""
    db = Database(f"sqlite:///{tmp_path / 'pool.sqlite3'}")
    opened: list[object] = []
    event.listen(db.engine, "connect", lambda connection, _record: opened.append(connection))
    try:
        burst = 20  # concurrent requests of a busy server
        for _ in range(2):
            connections = [db.engine.connect() for _ in range(burst)]
            for connection in connections:
                connection.exec_driver_sql("SELECT 1")
            for connection in connections:
                connection.close()
        assert len(opened) == burst
    finally:
        db.dispose()
