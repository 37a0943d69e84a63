"""The loader's in-memory filter of stored message keys: it only ever spares the exact check
for messages that were never stored, and follows the dedupe table when it changes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cdp.warehouse import Query, Warehouse
from ingestion.dedupe import KeyFilter
from ingestion.loader import loader_for
from tests.ingestion.conftest import track_load


def _accepted(warehouse: Warehouse, source_id: str, ids: list[str]) -> int:
    return loader_for(warehouse).load(track_load(source_id, ids))[source_id].accepted


def _stored(warehouse: Warehouse) -> list[str]:
    rows = warehouse.rows(Query("SELECT message_id FROM events ORDER BY event_id"))
    return [r[0] for r in rows]


def test_key_filter_answers_like_a_set_of_upper_halves() -> None:
    rng = np.random.default_rng(3)
    edges = np.array([0, 1, 2**56 - 1, 2**56, 2**63, 2**64 - 1], dtype=np.uint64)
    stored = np.concatenate([rng.integers(0, 2**64 - 1, 5_000, dtype=np.uint64), edges])
    keys = KeyFilter()
    keys.add(stored[:2_000])
    keys.add(stored[2_000:])  # in two adds, so partitions are merged
    assert keys.count == len(stored)
    others = rng.integers(0, 2**64 - 1, 5_000, dtype=np.uint64)
    asked = np.concatenate([others, stored[::7], edges])
    expected = np.isin(asked, stored)
    assert (keys.may_contain(asked) == expected).all()
    assert keys.may_contain(stored).all()
    assert not KeyFilter().may_contain(stored).any()
    built = KeyFilter.of(stored[:3_000])  # from the table: one sorted array
    built.add(stored[3_000:])
    assert built.count == len(stored)
    assert (built.may_contain(asked) == expected).all()


def test_a_message_repeated_within_a_load_is_stored_once_first_row_first(
    warehouse: Warehouse,
) -> None:
    load = track_load("s", ["a", "b", "a", "c", "b"])
    load.events = load.events.with_columns(pl.Series("event", ["1", "2", "3", "4", "5"]))
    assert loader_for(warehouse).load(load)["s"].accepted == 3
    rows = warehouse.rows(Query("SELECT message_id, event FROM events ORDER BY event_id"))
    assert rows == [("a", "1"), ("b", "2"), ("c", "4")]


def test_duplicates_across_loads_are_dropped_and_new_messages_kept(
    warehouse: Warehouse,
) -> None:
    assert _accepted(warehouse, "s", ["a", "b", "c"]) == 3
    # b and c are known (the filter sends them to the exact check); d is new; d twice in one
    # load keeps the first; the same message id in another source is another message.
    assert _accepted(warehouse, "s", ["b", "d", "c", "d"]) == 1
    assert _accepted(warehouse, "t", ["a"]) == 1
    assert _stored(warehouse) == ["a", "b", "c", "d", "a"]
    keys = loader_for(warehouse)._keys
    assert keys is not None
    assert keys.count == 5


def test_keys_written_behind_the_loaders_back_are_still_deduplicated(
    warehouse: Warehouse,
) -> None:
    assert _accepted(warehouse, "s", ["a"]) == 1  # the filter now knows one key
    # Another writer stores the key of ("s", "b"): the filter is rebuilt from the table.
    warehouse.execute(
        Query("INSERT INTO ingest_message_keys SELECT md5_number('s' || chr(0) || 'b')")
    )
    assert _accepted(warehouse, "s", ["b", "c"]) == 1
    assert _stored(warehouse) == ["a", "c"]


def test_keys_removed_from_the_table_are_not_held_against_new_messages(
    warehouse: Warehouse,
) -> None:
    assert _accepted(warehouse, "s", ["a", "b"]) == 2
    warehouse.execute(Query("DELETE FROM ingest_message_keys"))
    # The table no longer knows them: a message is dropped only when the table says so.
    assert _accepted(warehouse, "s", ["a"]) == 1
    assert _stored(warehouse) == ["a", "b", "a"]


def test_a_load_that_fails_leaves_no_key_in_the_filter(warehouse: Warehouse) -> None:
    assert _accepted(warehouse, "s", ["a"]) == 1
    broken = track_load("s", ["b"])
    broken.events = broken.events.with_columns(pl.lit(None, pl.String).alias("type"))
    with pytest.raises(Exception, match="NOT NULL"):  # DuckDB's constraint error
        loader_for(warehouse).load(broken)  # events.type is NOT NULL: the load fails
    keys = loader_for(warehouse)._keys
    assert keys is not None
    assert keys.count == 1
    assert _accepted(warehouse, "s", ["b"]) == 1
    assert _stored(warehouse) == ["a", "b"]


def test_beyond_its_limit_the_filter_is_dropped_and_dedupe_still_holds(
    warehouse: Warehouse,
) -> None:
    loader = loader_for(warehouse)
    loader.max_filter_keys = 3
    assert _accepted(warehouse, "s", ["a", "b"]) == 2
    assert loader._keys is not None
    assert _accepted(warehouse, "s", ["b", "c", "d"]) == 2  # 4 keys stored: over the limit
    assert _accepted(warehouse, "s", ["a", "d", "e"]) == 1
    assert loader._keys is None
    assert _stored(warehouse) == ["a", "b", "c", "d", "e"]
