"""Incremental resolution gives the same partition as a full rebuild, on random histories."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.warehouse import Query, Warehouse
from identity import queries, service
from identity.rules import IdentityRules
from tests.identity.conftest import Ev, EventWriter, Ident, partition, resolve

KINDS = ("user_id", "email", "phone", "anonymous_id", "loyalty_card")
identifier = st.tuples(st.sampled_from(KINDS), st.sampled_from(["1", "2", "3", "4", "5", "6"]))
blocked = st.just(("email", "unknown"))
event = st.lists(st.one_of(identifier, blocked), min_size=0, max_size=4, unique=True)
history = st.lists(st.lists(event, min_size=1, max_size=6), min_size=1, max_size=4)
rule_sets = st.sampled_from(
    [
        IdentityRules(limits={}, auto_cap=1000),
        IdentityRules(),
        IdentityRules(limits={"user_id": 1, "email": 2}, auto_cap=2),
    ]
)


@contextmanager
def fresh_warehouse() -> Iterator[Warehouse]:
    wh = Warehouse(":memory:", memory_limit="512MB", threads=1).open()
    try:
        yield wh
    finally:
        wh.close()


def _union_find_partition(batches: list[list[list[Ident]]]) -> set[frozenset[Ident]]:
    parent: dict[Ident, Ident] = {}

    def find(x: Ident) -> Ident:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for batch in batches:
        for ids in batch:
            usable = [i for i in ids if i != ("email", "unknown")]
            for i in usable:
                find(i)
            for other in usable[1:]:
                parent[find(other)] = find(usable[0])
    groups: dict[Ident, set[Ident]] = {}
    for node in parent:
        groups.setdefault(find(node), set()).add(node)
    return {frozenset(g) for g in groups.values()}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=history, rules=rule_sets)
def test_incremental_resolution_equals_full_rebuild(
    batches: list[list[list[Ident]]], rules: IdentityRules
) -> None:
    with fresh_warehouse() as incremental, fresh_warehouse() as rebuilt:
        for batch in batches:
            EventWriter(incremental).write([Ev(ids) for ids in batch])
            resolve(incremental, rules)
            EventWriter(rebuilt).write([Ev(ids) for ids in batch])
        resolve(rebuilt, rules, full=True)
        assert partition(incremental) == partition(rebuilt)
        assert _profile_contents(incremental) == _profile_contents(rebuilt)
        before = partition(incremental)
        resolve(incremental, rules, full=True)
        assert partition(incremental) == before
        if not rules.limits and rules.auto_cap >= 1000:
            assert partition(incremental) == _union_find_partition(batches)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=history, rules=rule_sets, data=st.data())
def test_incremental_equals_full_rebuild_with_unmerges(
    batches: list[list[list[Ident]]], rules: IdentityRules, data: st.DataObject
) -> None:
    with fresh_warehouse() as incremental, fresh_warehouse() as rebuilt:
        for batch in batches:
            EventWriter(incremental).write([Ev(ids) for ids in batch])
            resolve(incremental, rules)
            EventWriter(rebuilt).write([Ev(ids) for ids in batch])
            links = incremental.rows(Query("SELECT src, dst FROM identity_edges ORDER BY 1, 2"))
            unmerge: bool = data.draw(st.booleans(), label="unmerge")
            if links and unmerge:
                src, dst = data.draw(st.sampled_from(links), label="link")
                action = data.draw(st.sampled_from(["remove_link", "remove_identifier"]))
                for wh in (incremental, rebuilt):
                    wh.rows(
                        queries.add_override(
                            action=action,
                            src=src,
                            dst=dst if action == "remove_link" else None,
                            profile_id="p",
                            reason=None,
                            actor=None,
                            at=datetime(2026, 1, 1),
                        )
                    )
                resolve(incremental, rules)
        resolve(rebuilt, rules, full=True)
        assert partition(incremental) == partition(rebuilt)
        assert _profile_contents(incremental) == _profile_contents(rebuilt)


def _profile_contents(warehouse: Warehouse) -> list[str]:
    """The profile rows without their random ids and run times: events, identifiers, traits
    (JSON objects compared by content: their key order follows the aggregation's)."""
    return sorted(
        json.dumps([r[3], json.loads(str(r[4])), json.loads(str(r[5]))], sort_keys=True)
        for r in _profile_rows(warehouse)
    )


def _profile_rows(warehouse: Warehouse) -> list[tuple[object, ...]]:
    return warehouse.rows(
        Query(
            "SELECT profile_id, first_seen, last_seen, event_count, identifiers::VARCHAR,"
            " traits::VARCHAR FROM profiles ORDER BY profile_id"
        )
    )


def test_profiles_written_in_id_ranges_equal_one_statement(monkeypatch: pytest.MonkeyPatch) -> None:
    from identity import resolver

    assert resolver._profile_ranges(10) == [(None, None)]
    ranges = resolver._profile_ranges(16 * resolver.PROFILES_PER_STATEMENT)
    assert len(ranges) == 16
    assert ranges[0] == (None, "1")
    assert ranges[-1] == ("f", None)
    # A full rebuild's ranges are of its profiles' dense keys 1..n, covering each key once.
    assert resolver._key_ranges(10) == [(1, 11)]
    monkeypatch.setattr(resolver, "PROFILES_PER_STATEMENT", 3)
    assert resolver._key_ranges(7) == [(1, 3), (3, 5), (5, 8)]
    monkeypatch.undo()
    events = [Ev([("user_id", str(k)), ("email", f"{k}@x.org")]) for k in range(40)]
    with fresh_warehouse() as one, fresh_warehouse() as split:
        EventWriter(one).write(events)
        resolve(one, full=True)
        EventWriter(split).write(events)
        monkeypatch.setattr(resolver, "PROFILES_PER_STATEMENT", 3)
        resolve(split, full=True)
        rows = _profile_rows(split)
        assert len(rows) == 40
        # Profile ids are random: compare everything else.
        assert sorted(map(str, (r[1:] for r in rows))) == sorted(
            map(str, (r[1:] for r in _profile_rows(one)))
        )
        # Re-resolving everything in ranges keeps every profile (ids and rows).
        resolve(split, full=True)
        assert [r[0] for r in _profile_rows(split)] == [r[0] for r in rows]
        # Ranges are written in ascending id order: the table is stored sorted by id.
        stored = [r[0] for r in split.rows(Query("SELECT profile_id FROM profiles"))]
        assert stored == sorted(stored)


def test_profile_rows_after_an_unmerge_equal_full_rebuild() -> None:
    """An event whose identifiers an admin cut apart: when a later event touches only the
    less trusted side, the old event still belongs to the more trusted side's profile (the
    incremental refresh must look up the identifier outside the run's components)."""
    first = [Ev([("user_id", "u1"), ("email", "a@x.com")], traits={"n": 1})]
    later = [Ev([("email", "a@x.com")], traits={"n": 2})]
    with fresh_warehouse() as incremental, fresh_warehouse() as rebuilt:
        for wh in (incremental, rebuilt):
            EventWriter(wh).write(first)
        resolve(incremental)
        (src, dst), *_ = incremental.rows(Query("SELECT src, dst FROM identity_edges"))
        for wh in (incremental, rebuilt):
            wh.rows(
                queries.add_override(
                    action="remove_link",
                    src=src,
                    dst=dst,
                    profile_id="p",
                    reason=None,
                    actor=None,
                    at=datetime(2026, 1, 1),
                )
            )
        resolve(incremental)
        for wh in (incremental, rebuilt):
            EventWriter(wh).write(later)
        resolve(incremental)
        resolve(rebuilt, full=True)
        rows = _profile_rows(incremental)
        assert [r[3] for r in rows] == [1, 1]
        assert sorted(map(str, (r[3:] for r in rows))) == sorted(
            map(str, (r[3:] for r in _profile_rows(rebuilt)))
        )


def _erase(warehouse: Warehouse, rules: IdentityRules, profile_id: str) -> None:
    """Erase a profile as `DELETE /api/profiles/{id}` does (the audit row aside)."""
    from identity import resolver

    resolver.erase(warehouse, rules=rules, profile_id=profile_id, at=datetime(2026, 2, 1))


def _assert_equals_full_rebuild(warehouse: Warehouse, rules: IdentityRules) -> None:
    """A full rebuild of the same warehouse (its events after the erasures) changes nothing."""
    before = (partition(warehouse), _profile_contents(warehouse))
    resolve(warehouse, rules, full=True)
    assert (partition(warehouse), _profile_contents(warehouse)) == before


def test_erasure_reopens_a_capped_identifier_of_the_erased_person() -> None:
    """A phone shared by three people is over `auto_cap=2`; erasing one of them brings it
    under the cap: the two others merge through it, as a full rebuild of the rest says."""
    rules = IdentityRules(auto_cap=2, limits={})
    phone = ("phone", "+33600000001")
    with fresh_warehouse() as wh:
        events = EventWriter(wh)
        events.write([Ev([("email", f"p{i}@x.com"), phone]) for i in range(3)])
        resolve(wh, rules)
        assert wh.scalar(Query("SELECT status FROM identity_nodes WHERE kind = 'phone'")) == (
            "capped"
        )
        _erase(wh, rules, service.lookup(wh, kind="email", value="p0@x.com") or "")
        assert partition(wh) == {frozenset({("email", "p1@x.com"), ("email", "p2@x.com"), phone})}
        events.write([Ev([("user_id", "other")])])
        resolve(wh, rules)
        _assert_equals_full_rebuild(wh, rules)


def test_erasure_drops_what_only_the_erased_events_carried() -> None:
    """The erased person's event also carried user ids a limit kept apart: `o` (seen nowhere
    else: a profile of its own without events) and `z` (seen again later), and a phone over
    `auto_cap=2`. A full rebuild of the remaining events has no `o` and no z - phone link,
    so the phone is under the cap and joins `u1`."""
    rules = IdentityRules(auto_cap=2)
    phone = ("phone", "+33600000001")
    with fresh_warehouse() as wh:
        events = EventWriter(wh)
        events.write(
            [
                # `a` wins the event: the same kind as `z` and `o`, and a smaller node id.
                Ev([("user_id", "a"), ("user_id", "z"), ("user_id", "o"), phone]),
                Ev([("user_id", "u1"), phone]),
                Ev([("user_id", "z")]),
            ]
        )
        resolve(wh, rules)
        assert service.lookup(wh, kind="user_id", value="o") is not None
        _erase(wh, rules, service.lookup(wh, kind="user_id", value="a") or "")
        assert service.lookup(wh, kind="user_id", value="o") is None
        assert partition(wh) == {
            frozenset({("user_id", "u1"), phone}),
            frozenset({("user_id", "z")}),
        }
        _assert_equals_full_rebuild(wh, rules)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=history, rules=rule_sets, data=st.data())
def test_incremental_equals_full_rebuild_with_erasures(
    batches: list[list[list[Ident]]], rules: IdentityRules, data: st.DataObject
) -> None:
    with fresh_warehouse() as wh:
        events = EventWriter(wh)
        for batch in batches:
            events.write([Ev(ids) for ids in batch])
            resolve(wh, rules)
            live = sorted({str(r[2]) for r in wh.rows(queries.PARTITION)})
            erase: bool = data.draw(st.booleans(), label="erase")
            if live and erase:
                _erase(wh, rules, data.draw(st.sampled_from(live), label="profile"))
        _assert_equals_full_rebuild(wh, rules)
