"""The labelling engines agree: scipy, set-based SQL, and the rule-aware union-find."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp.warehouse import Query, Warehouse
from identity.labelling import component_labels, rule_aware_labels, sql_component_labels

edge_lists = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=60)


def _sql_labels(warehouse: Warehouse, src: np.ndarray, dst: np.ndarray) -> dict[int, int]:
    frame = pl.DataFrame({"src": src, "dst": dst})
    with warehouse.transaction() as cur:
        cur.register("edges_frame", frame)
        cur.execute("CREATE OR REPLACE TEMP TABLE sql_edges AS SELECT * FROM edges_frame")
        cur.unregister("edges_frame")
        sql_component_labels(cur)
        rows = cur.sql("SELECT node_id, label FROM sql_labels").fetchall()
    return {int(n): int(label) for n, label in rows}


def _scipy_labels(src: np.ndarray, dst: np.ndarray) -> dict[int, int]:
    nodes = np.unique(np.concatenate([src, dst]))
    labels = component_labels(nodes, src, dst)
    return dict(zip(nodes.tolist(), labels.tolist(), strict=True))


@settings(max_examples=30, deadline=None)
@given(edges=edge_lists)
def test_sql_labelling_matches_scipy_on_random_graphs(edges: list[tuple[int, int]]) -> None:
    # Spread ids like hashes do, so the graph is not ordered by id.
    rng = np.random.default_rng(len(edges))
    ids = rng.permutation(1000)[:41].astype(np.int64) * 7919
    src = ids[np.array([a for a, _ in edges])]
    dst = ids[np.array([b for _, b in edges])]
    wh = Warehouse(":memory:", threads=1).open()
    try:
        assert _sql_labels(wh, src, dst) == _scipy_labels(src, dst)
    finally:
        wh.close()


def test_sql_labelling_collapses_a_long_chain_in_few_rounds(warehouse: Warehouse) -> None:
    rng = np.random.default_rng(7)
    path = rng.permutation(5000).astype(np.int64)
    src, dst = path[:-1], path[1:]
    frame = pl.DataFrame({"src": src, "dst": dst})
    with warehouse.transaction() as cur:
        cur.register("edges_frame", frame)
        cur.execute("CREATE OR REPLACE TEMP TABLE sql_edges AS SELECT * FROM edges_frame")
        cur.unregister("edges_frame")
        rounds = sql_component_labels(cur)
        labels = cur.sql("SELECT DISTINCT label FROM sql_labels").fetchall()
    assert labels == [(0,)]
    assert rounds < 40
    assert warehouse.scalar(Query("SELECT 1")) == 1


def test_component_labels_are_the_smallest_node_of_each_component() -> None:
    nodes = np.array([3, 5, 8, 13, 21], dtype=np.int64)
    labels = component_labels(nodes, np.array([21, 5]), np.array([8, 13]))
    assert labels.tolist() == [3, 5, 8, 5, 8]


def test_rule_aware_union_find_refuses_the_link_over_the_limit_in_time_order() -> None:
    nodes = np.array([1, 2, 3, 4], dtype=np.int64)
    kinds = ["user_id", "email", "user_id", "phone"]
    edges = [(1, 2, 10), (2, 3, 11), (3, 4, 12)]
    labels, refused = rule_aware_labels(nodes, kinds, edges, {"user_id": 1})
    assert labels.tolist() == [1, 1, 3, 3]
    assert [(r.src, r.dst, r.event_id, r.kind) for r in refused] == [(2, 3, 11, "user_id")]
