"""The warehouse: versioned schema, bound parameters, safe identifiers, threads, file lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

from cdp.errors import WarehouseLocked
from cdp.warehouse import Query, Warehouse, holder_file, quote_ident, with_ctes
from cdp.warehouse_schema import MIGRATIONS


def test_schema_is_at_latest_version_and_reopening_applies_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.duckdb"
    with Warehouse(path) as wh:
        assert wh.schema_version() == max(m.version for m in MIGRATIONS)
        tables = set(
            wh.run(Query("SELECT table_name FROM information_schema.tables"))["table_name"]
        )
        assert {"schema_version", "events", "event_identifiers", "ingest_batches"} <= tables
        wh.execute(Query("INSERT INTO ingest_batches VALUES (1, 's', 'http', 1, 1, 1, now())"))
    with Warehouse(path) as wh:
        assert wh.scalar(Query("SELECT count(*) FROM schema_version")) == len(MIGRATIONS)
        assert wh.scalar(Query("SELECT count(*) FROM ingest_batches")) == 1


def test_values_are_bound_not_interpolated(warehouse: Warehouse) -> None:
    hostile = "x'); DROP TABLE events; --"
    frame = warehouse.run(Query("SELECT $v AS v", {"v": hostile}))
    assert frame["v"].to_list() == [hostile]
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 0


def test_quote_ident_rejects_anything_but_plain_names() -> None:
    assert quote_ident("events") == '"events"'
    for bad in ('a"b', "a b", "1abc", "x;drop", ""):
        with pytest.raises(ValueError, match="identifier"):
            quote_ident(bad)


def test_with_ctes_joins_named_steps(warehouse: Warehouse) -> None:
    sql = with_ctes(
        [("a", "SELECT 1 AS n UNION ALL SELECT 2"), ("b", 'SELECT n * 10 AS m FROM "a"')],
        'SELECT sum(m) AS total FROM "b"',
    )
    assert warehouse.scalar(Query(sql)) == 30


def test_results_come_back_as_polars_and_arrow(warehouse: Warehouse) -> None:
    q = Query("SELECT range AS n FROM range($k)", {"k": 5})
    assert isinstance(warehouse.run(q), pl.DataFrame)
    assert warehouse.arrow(q).num_rows == 5


def test_transaction_rolls_back_on_error(warehouse: Warehouse) -> None:
    def insert_then_fail() -> None:
        with warehouse.transaction() as cur:
            cur.execute("INSERT INTO ingest_batches VALUES (1, 's', 'http', 1, 1, 1, now())")
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        insert_then_fail()
    assert warehouse.scalar(Query("SELECT count(*) FROM ingest_batches")) == 0


def test_concurrent_threads_each_use_their_own_cursor(warehouse: Warehouse) -> None:
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(50):
                with warehouse.transaction() as cur:
                    cur.execute(
                        "INSERT INTO ingest_batches VALUES ($id, 's', 'http', 1, 1, 1, now())",
                        {"id": offset * 1000 + i},
                    )
                warehouse.scalar(Query("SELECT count(*) FROM ingest_batches"))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert warehouse.scalar(Query("SELECT count(*) FROM ingest_batches")) == 200


def test_second_process_gets_a_clear_message_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "held.duckdb"
    with Warehouse(path, holder="cdp server (http://127.0.0.1:8123)"):
        assert holder_file(path).exists()
        script = textwrap.dedent(
            f"""
            from cdp.errors import WarehouseLocked
            from cdp.warehouse import Warehouse
            try:
                Warehouse({str(path)!r}).open()
            except WarehouseLocked as exc:
                print(exc.message)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        assert "cdp server (http://127.0.0.1:8123)" in result.stdout
        assert "in use" in result.stdout
    assert not holder_file(path).exists()
    # Released: another open now works.
    Warehouse(path).open().close()


def test_locked_error_is_a_cdp_error() -> None:
    assert WarehouseLocked.status_code == 503


def test_the_write_counter_moves_after_every_possible_write_and_never_for_a_read(
    warehouse: Warehouse,
) -> None:
    """Callers cache state read after `writes`; a write it missed would make them stale."""
    warehouse.execute(Query("CREATE TABLE t (a INTEGER)"))

    def moved(action: Callable[[], object]) -> bool:
        before = warehouse.writes
        action()
        return warehouse.writes != before

    reads = [
        lambda: warehouse.rows(Query("SELECT a FROM t")),
        lambda: warehouse.scalar(Query("  select count(*) FROM t WHERE a = $a", {"a": 1})),
        lambda: warehouse.run(Query("WITH x AS (SELECT a FROM t) SELECT * FROM x")),
        lambda: warehouse.arrow(Query("SELECT 1 AS updated_at")),
    ]
    assert not any(moved(r) for r in reads)
    writes = [
        lambda: warehouse.execute(Query("INSERT INTO t VALUES (1)")),
        lambda: warehouse.rows(Query("INSERT INTO t VALUES (2) RETURNING a")),
        lambda: warehouse.scalar(Query("WITH x AS (SELECT 3) INSERT INTO t SELECT * FROM x")),
        lambda: warehouse.rows(Query("SELECT 1; DELETE FROM t WHERE a = 3")),
        lambda: warehouse.run(Query("UPDATE t SET a = a + 10 WHERE a = 2")),
        lambda: warehouse.execute(Query("CREATE SEQUENCE s1")),
        lambda: warehouse.scalar(Query("SELECT nextval('s1')")),
    ]
    assert all(moved(w) for w in writes)

    # A transaction moves it once committed, not before: state read inside the transaction
    # under the old value would otherwise be trusted after the commit.
    before = warehouse.writes
    with warehouse.transaction() as cur:
        cur.execute("INSERT INTO t VALUES (5)")
        assert warehouse.writes == before
    assert warehouse.writes > before
    before = warehouse.writes
    with warehouse.cursor() as cur:
        cur.execute("INSERT INTO t VALUES (7)")
    assert warehouse.writes > before
