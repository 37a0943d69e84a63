"""Identity resolution: from event identifiers to stable profiles, full or incremental.

One run, in one warehouse transaction:

1. New event identifiers (after the stored mark) become nodes (a hash of kind and value)
   and links: each event links its identifiers as a star around its most trusted one. The
   link table is an append-only log; admins' unmerge decisions are overrides on top of it.
2. Node status: a blocked value or pattern, an identifier detached by an admin, or one
   linked to more higher-priority identifiers than the cap is left out of every link. An
   erasure re-resolves in its own transaction (`erase`): the identifiers whose links it
   changed are recomputed like those of a changed unmerge decision.
3. Affected raw components (all nodes of the components reached by new links or changed
   statuses; everything in a full rebuild) are relabelled: scipy connected components on the
   integer edge list, then a time-ordered, rule-aware union-find for the few components over
   a per-kind limit. Recomputing whole components is what makes incremental == full.
4. Stable ids: each old profile stays with the new piece holding its birth identifiers
   (else most of its identifiers); among the profiles staying in one piece the oldest
   survives, the others are merged into it; parts that leave a profile are splits; pieces
   nobody stays in get a new id; ids once merged into a splitting profile follow their birth
   identifiers. Merges and splits are appended to `profile_merges`, the publication later
   layers consume.
5. The `profiles` rows of every touched profile are rebuilt (identifiers by kind, first and
   last seen, traits by survivorship).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import polars as pl

from cdp.warehouse import Cursor, Query, Warehouse
from identity import queries
from identity.labelling import dense_components, rule_aware_labels, smallest_ids
from identity.rules import IdentityRules

logger = logging.getLogger(__name__)

Mode = Literal["full", "incremental"]

# One resolution at a time per process: the job, the API and unmerges all write the graph.
_RESOLVE_LOCK = threading.Lock()


@dataclass(slots=True)
class ResolveResult:
    """What one resolution run did."""

    mode: Mode
    up_to_event_id: int
    events: int = 0
    new_identifiers: int = 0
    new_links: int = 0
    affected_identifiers: int = 0
    profiles_written: int = 0
    new_profiles: int = 0
    merges: int = 0
    splits: int = 0
    rule_components: int = 0
    refused_links: int = 0
    excluded_identifiers: int = 0
    labelling_seconds: float = 0.0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:  # Any: JSON values
        """The result as JSON-ready data."""
        return asdict(self)


def resolve(warehouse: Warehouse, *, rules: IdentityRules, full: bool = False) -> ResolveResult:
    """Resolve the events not yet resolved (or everything when `full`) into profiles."""
    started = time.perf_counter()
    with _RESOLVE_LOCK, warehouse.transaction() as cur:
        result = _resolve(cur, rules=rules, full=full)
    result.seconds = round(time.perf_counter() - started, 4)
    # A run that found nothing (identity's job polls every 5 s, real time every pass) at DEBUG.
    idle = not (result.events or result.affected_identifiers)
    logger.log(logging.DEBUG if idle else logging.INFO, "identity resolved", extra=result.as_dict())
    return result


def erase(
    warehouse: Warehouse, *, rules: IdentityRules, profile_id: str, at: datetime
) -> tuple[int, int]:
    """Erase a live profile and re-resolve what the erasure changed, in one transaction.

    The erasure deletes the person's events and identifiers, so the graph of the others
    changes too: a capped identifier may fall under the cap, identifiers and links known only
    from the erased events disappear. `queries.erase_profile` repairs the graph (what a full
    rebuild of the remaining events would hold) and names the identifiers it touched; this
    run recomputes their statuses and components as for an unmerge, so incremental
    resolution keeps giving the full rebuild's profiles.

    Returns:
        (events erased, identifiers erased).
    """
    with _RESOLVE_LOCK, warehouse.transaction() as cur:
        counts = queries.run_script(cur, queries.erase_profile(profile_id, at))
        assert counts is not None
        result = _resolve(cur, rules=rules, full=False, repair=True)
        queries.run_script(cur, queries.BUMP_PROFILES_VERSION)
    logger.info("identity resolved after an erasure", extra=result.as_dict())
    return int(counts[0]), int(counts[1])


def _resolve(
    cur: Cursor, *, rules: IdentityRules, full: bool, repair: bool = False
) -> ResolveResult:
    """One run on a cursor inside a transaction; `repair`: an erasure in the same transaction
    left the identifiers whose links changed in `er_repair` (recomputed like the nodes of a
    changed unmerge decision)."""
    started = time.perf_counter()
    now = datetime.now(UTC).replace(tzinfo=None)
    timings: dict[str, float] = {}

    def step(query: Query) -> None:
        began = time.perf_counter()
        queries.run_script(cur, query)
        name = " ".join(query.sql.split()[:6])
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - began, 4)

    state = _read_state(cur)
    fingerprint = rules.fingerprint()
    mark = int(state.get(queries.STATE_MARK, (0, None))[0] or 0)
    seq = int(state.get(queries.STATE_SEQ, (0, None))[0] or 0)
    seen_overrides = int(state.get(queries.STATE_OVERRIDES, (0, None))[0] or 0)
    old_fingerprint = state.get(queries.STATE_RULES, (None, None))[1]
    if old_fingerprint is not None and old_fingerprint != fingerprint and not full:
        logger.info("identity rules changed: full rebuild")
        full = True
    up_to = int(_scalar(cur, queries.MAX_EVENT_ID))
    # Never below the mark: an erasure deletes overrides, so the stored maximum can go back.
    override_version = max(int(_scalar(cur, queries.MAX_OVERRIDE_VERSION)), seen_overrides)
    result = ResolveResult(mode="full" if full else "incremental", up_to_event_id=up_to)
    if not full and not repair and up_to <= mark and override_version <= seen_overrides:
        if old_fingerprint is None:
            queries.run_script(cur, queries.write_state(queries.STATE_RULES, text=fingerprint))
        result.up_to_event_id = mark
        return result
    _load_rules(cur, rules)
    if full:
        step(queries.SNAPSHOT_FOR_FULL)
        mark = 0
    suppressions = int(_scalar(cur, queries.ACTIVE_SUPPRESSIONS)) > 0
    step(queries.new_event_identifiers(mark, up_to, suppressions=suppressions, node_ids=full))
    step(queries.changed_overrides(-1 if full else seen_overrides, repair=repair and not full))
    if full:
        step(queries.full_graph(rules.combined_pattern()))
        step(queries.FULL_LINKS)
        step(queries.STORE_LINKS)
        step(queries.ACTIVE_REMOVED_LINKS)
        step(queries.full_status(rules.auto_cap))
        step(queries.EVENT_WINNERS_FULL)
    else:
        step(queries.insert_new_nodes(rules.combined_pattern()))
        step(queries.TOUCH_SEEN_NODES)
        step(queries.NEW_EVENT_NODES)
        step(queries.NEW_LINKS)
        step(queries.STORE_LINKS)
        step(queries.ACTIVE_REMOVED_LINKS)
        queries.run_script(cur, queries.STATUS_CANDIDATES_INCREMENTAL)
        step(queries.compute_status(rules.auto_cap))
        step(queries.APPLY_STATUS)
        step(queries.AFFECTED_INCREMENTAL)
        step(queries.OLD_ASSIGNMENT_INCREMENTAL)

    nodes = cur.sql(queries.AFFECTED_ACTIVE_NODES.sql).pl()
    links = cur.sql((queries.AFFECTED_LINKS_FULL if full else queries.AFFECTED_LINKS).sql).pl()
    if full:
        queries.run_script(cur, queries.DROP_FULL_LINK_COPIES)
    began = time.perf_counter()
    labels, refusals, rule_components = label_profiles(nodes, links, rules.limits)
    result.labelling_seconds = round(time.perf_counter() - began, 4)
    used = links.select("src", "dst", "first_event_id").join(
        refusals.select("src", "dst"), on=["src", "dst"], how="anti"
    )
    # Each label's birth (its earliest identifier) is then a group-by of `id_labels` alone.
    _temp_table(cur, "id_labels", labels.with_columns(nodes["first_event_id"]))
    _temp_table(cur, "id_refusals", refusals)
    _temp_table(cur, "id_used_links", used)
    result.rule_components = rule_components
    result.refused_links = refusals.height
    # The warehouse holds copies now; the frames would only add to the peak memory.
    del nodes, links, labels, refusals, used

    step(queries.RECONCILE)
    if not full and int(_scalar(cur, queries.REVIVE_COUNT)):
        step(queries.REVIVE_LIVE)
    step(queries.LABEL_IDS)
    step(queries.REDIRECTS)
    if full:
        # Nodes are written once, labelled; the publication's reasons name them.
        step(queries.WRITE_NODES_FULL)
    step(queries.CHANGES)
    step(queries.publish_changes(seq=seq, at=now, nodes="full" if full else "incremental"))
    step(queries.register_profiles(now))
    if not full:
        step(queries.APPLY_ASSIGNMENT)
    step(queries.record_decisions(now))
    if not full:
        queries.run_script(cur, queries.GRAPH_COUNTS)
    counts = cur.execute(queries.RUN_COUNTS.sql).fetchall()[0]
    (
        result.events,
        result.new_identifiers,
        result.new_links,
        result.affected_identifiers,
        result.new_profiles,
        result.merges,
        result.splits,
    ) = (int(c) for c in counts[:7])
    if full:
        # The graph is written: its working copies go before the profile rows are built
        # (millions of rows the aggregations would otherwise have to share memory with).
        queries.run_script(cur, queries.DROP_FULL_GRAPH_COPIES)
        step(queries.DIRTY_PROFILES_FULL)
        step(queries.EVENT_PROFILES_FULL)
    else:
        step(queries.DIRTY_PROFILES)
        step(queries.EVENT_PROFILES_DIRTY)
    result.profiles_written = int(_scalar(cur, queries.COUNT_DIRTY))
    ranked = bool(rules.trait_source_priority)
    if full:
        for first, end in _key_ranges(int(_scalar(cur, queries.COUNT_PROFILE_KEYS))):
            step(queries.refresh_profiles_full(now, low=first, high=end, prioritised=ranked))
    else:
        for low, high in _profile_ranges(result.profiles_written):
            step(queries.refresh_profiles(now, low=low, high=high, prioritised=ranked))

    # Statuses were applied before id_aff was taken, so id_aff has the new statuses.
    result.excluded_identifiers = int(counts[7])
    for name, number, text in (
        (queries.STATE_MARK, up_to, None),
        (queries.STATE_SEQ, seq + result.merges + result.splits, None),
        (queries.STATE_OVERRIDES, override_version, None),
        (queries.STATE_RULES, None, fingerprint),
    ):
        queries.run_script(cur, queries.write_state(name, number=number, text=text))
    queries.run_script(cur, queries.BUMP_PROFILES_VERSION)
    result.seconds = round(time.perf_counter() - started, 4)
    logger.debug("identity resolution steps", extra={"seconds_per_step": timings})
    return result


def label_profiles(
    nodes: pl.DataFrame, links: pl.DataFrame, limits: dict[str, int]
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Raw components and profile labels of the given nodes and links.

    Args:
        nodes: `node_id` (sorted, unique) and `kind` of the active nodes.
        links: `src`, `dst`, `first_event_id`, `high_rank`, `low_rank` between those nodes.
        limits: most identifiers of a kind one profile may hold.

    Returns:
        `(node_id, component_id, label)` per node, the refused links
        `(src, dst, event_id, kind, lim)`, and how many components needed the rule-aware pass.
    """
    node_ids = nodes["node_id"].to_numpy().astype(np.int64, copy=False)
    src = links["src"].to_numpy().astype(np.int64, copy=False)
    dst = links["dst"].to_numpy().astype(np.int64, copy=False)
    count, dense, src_index = dense_components(node_ids, src, dst)
    # Components over a per-kind limit: count each limited kind per component.
    over = np.zeros(count, dtype=bool)
    kinds = nodes["kind"]
    for kind, limit in limits.items():
        of_kind = (kinds == kind).to_numpy()
        if of_kind.any():
            over |= np.bincount(dense[of_kind], minlength=count) > limit
    components = smallest_ids(node_ids, dense, count)
    labels = components.copy()
    refusal_schema = {
        "src": pl.Int64,
        "dst": pl.Int64,
        "event_id": pl.Int64,
        "kind": pl.String,
        "lim": pl.Int64,
    }
    refusals = pl.DataFrame(schema=refusal_schema)
    rule_components = int(over.sum())
    if rule_components:
        mask = over[dense]
        sub_nodes = node_ids[mask]
        sub_kinds = kinds.filter(pl.Series(mask)).to_list()
        link_mask = over[dense[src_index]]
        sub_links = (
            links.filter(pl.Series(link_mask))
            .sort("first_event_id", "high_rank", "low_rank", "src", "dst")
            .select("src", "dst", "first_event_id")
        )
        sub_labels, refused = rule_aware_labels(
            sub_nodes, sub_kinds, list(sub_links.iter_rows()), limits
        )
        labels[mask] = sub_labels
        refusals = pl.DataFrame(
            [(r.src, r.dst, r.event_id, r.kind, r.limit) for r in refused],
            schema=refusal_schema,
            orient="row",
        )
    out = pl.DataFrame({"node_id": node_ids, "component_id": components, "label": labels})
    return out, refusals, rule_components


# Profiles rebuilt per statement: above this many, the rebuild is split into id ranges.
PROFILES_PER_STATEMENT = 250_000
_HEX = "0123456789abcdef"


def _profile_ranges(dirty: int) -> list[tuple[str | None, str | None]]:
    """Ascending `[low, high)` ranges of profile ids (UUIDs: lower-case hex first character)
    that split `dirty` profiles into statements of about PROFILES_PER_STATEMENT."""
    parts = min(len(_HEX), max(1, -(-dirty // PROFILES_PER_STATEMENT)))
    bounds: list[str | None] = [None]
    bounds += [_HEX[len(_HEX) * k // parts] for k in range(1, parts)]
    bounds.append(None)
    return list(itertools.pairwise(bounds))


def _key_ranges(keys: int) -> list[tuple[int, int]]:
    """Ascending `[first, end)` ranges of the keys 1..keys of a full rebuild's profiles, of
    about PROFILES_PER_STATEMENT each."""
    parts = max(1, -(-keys // PROFILES_PER_STATEMENT))
    bounds = [1 + keys * k // parts for k in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _load_rules(cur: Cursor, rules: IdentityRules) -> None:
    _temp_table(
        cur,
        "id_kind_rank",
        pl.DataFrame(
            {"kind": rules.kind_priority, "rank": list(range(len(rules.kind_priority)))},
            schema={"kind": pl.String, "rank": pl.Int32},
        ),
    )
    _temp_table(
        cur,
        "id_block_values",
        pl.DataFrame({"value": rules.blocked_values}, schema={"value": pl.String}),
    )
    _temp_table(
        cur,
        "id_block_patterns",
        pl.DataFrame({"pattern": rules.blocked_patterns}, schema={"pattern": pl.String}),
    )
    sources = [
        (trait, source, prio)
        for trait, ordered in rules.trait_source_priority.items()
        for prio, source in enumerate(ordered)
    ]
    _temp_table(
        cur,
        "id_trait_sources",
        pl.DataFrame(
            sources,
            schema={"trait": pl.String, "source_id": pl.String, "prio": pl.Int32},
            orient="row",
        ),
    )


def _temp_table(cur: Cursor, name: str, frame: pl.DataFrame) -> None:
    view = f"{name}_frame"
    cur.register(view, frame)
    try:
        cur.execute(queries.FRAME_COPIES[name].sql)
    finally:
        cur.unregister(view)


def _read_state(cur: Cursor) -> dict[str, tuple[int | None, str | None]]:
    rows = cur.execute(queries.read_state().sql).fetchall()
    return {str(name): (number, text) for name, number, text in rows}


def _scalar(cur: Cursor, query: Query) -> Any:  # Any: SQL value
    rows = cur.execute(query.sql, query.params or None).fetchall()
    return rows[0][0] if rows else None
