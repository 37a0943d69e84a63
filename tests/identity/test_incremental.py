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


# Rules that change between batches: the kinds' priority, what a value pattern blocks ("3",
# "4", "5" are values of the histories), per-kind limits, the cap, and a source that wins
# trait `n` over recency.
changing_rules = st.builds(
    lambda priority, patterns, limits, cap, crm_first: IdentityRules(
        kind_priority=priority,
        blocked_patterns=patterns,
        limits=limits,
        auto_cap=cap,
        trait_source_priority={"n": ["crm"]} if crm_first else {},
    ),
    priority=st.sampled_from(
        [
            list(KINDS),
            ["email", "phone", "user_id", "loyalty_card", "anonymous_id"],
            ["anonymous_id", "user_id"],  # the others unlisted: ranked last, together
        ]
    ),
    patterns=st.lists(st.sampled_from(["3", "[45]", r"(test|noreply)@.*"]), unique=True),
    limits=st.sampled_from([{}, {"user_id": 1}, {"user_id": 1, "email": 2}]),
    cap=st.sampled_from([2, 1000]),
    crm_first=st.booleans(),
)
sourced_batch = st.lists(st.tuples(event, st.sampled_from(["web", "crm"])), min_size=1, max_size=6)


class _Consumer:
    """A layer keyed by profile id (as loyalty is) that learns ids from the profiles and moves
    its records by identity's publication alone."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.seq = 0

    def catch_up(self, warehouse: Warehouse) -> None:
        published = service.merges_since(warehouse, after_seq=self.seq)
        live = {str(r[0]) for r in warehouse.rows(Query("SELECT profile_id FROM profiles"))}
        assert published["seq"].to_list() == list(
            range(self.seq + 1, self.seq + 1 + published.height)
        )
        for row in published.iter_rows(named=True):
            # Merges and splits move an id the layer holds (an old profile, not merged away by
            # an earlier row) to a live profile (the consumer catches up after every run).
            assert row["from_profile_id"] in self.held, row
            assert row["to_profile_id"] in live, row
            if row["kind"] == "merge":
                self.held.discard(row["from_profile_id"])
            self.held.add(row["to_profile_id"])
        self.seq += published.height
        # Every live profile is known, and the merged-away ids are gone.
        merged = {
            str(r[0])
            for r in warehouse.rows(
                Query("SELECT profile_id FROM identity_profile_ids WHERE merged_into IS NOT NULL")
            )
        }
        assert not (live & merged)
        assert not (self.held & merged - live), sorted(self.held & merged - live)
        # What a layer still holds without a live profile is only the documented gap: a
        # profile all of whose identifiers the new rules block (no publication, no row).
        for pid in self.held - live:
            assert not warehouse.rows(
                Query("SELECT 1 FROM identity_nodes WHERE profile_id = $p", {"p": pid})
            )
        self.held |= live


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(st.tuples(sourced_batch, changing_rules), min_size=2, max_size=4),
    data=st.data(),
)
def test_incremental_equals_full_rebuild_when_the_rules_change_between_batches(
    batches: list[tuple[list[tuple[list[Ident], str]], IdentityRules]], data: st.DataObject
) -> None:
    """Each batch is resolved under its own rules (a change of rules is a full rebuild of the
    whole history); the end state is the full rebuild of every event under the last rules,
    and the publication keeps a consumer's ids in step with the profiles."""
    consumer = _Consumer()
    count = 0
    with fresh_warehouse() as incremental, fresh_warehouse() as rebuilt:
        previous: IdentityRules | None = None
        for batch, rules in batches:
            evs = []
            for ids, source in batch:
                count += 1
                evs.append(Ev(ids, traits={"n": count}, source=source))
            EventWriter(incremental).write(evs)
            EventWriter(rebuilt).write(evs)
            result = resolve(incremental, rules)
            if previous is not None and previous.fingerprint() != rules.fingerprint():
                assert result.mode == "full"
            previous = rules
            consumer.catch_up(incremental)
            # A run with nothing new under the same rules publishes nothing.
            if data.draw(st.booleans(), label="again"):
                again = resolve(incremental, rules)
                assert (again.mode, again.merges, again.splits) == ("incremental", 0, 0)
                consumer.catch_up(incremental)
        last = batches[-1][1]
        resolve(rebuilt, last, full=True)
        assert partition(incremental) == partition(rebuilt)
        assert _profile_contents(incremental) == _profile_contents(rebuilt)
        _assert_equals_full_rebuild(incremental, last)
        consumer.catch_up(incremental)


def test_a_profile_split_and_merged_in_one_run_publishes_the_split_first() -> None:
    """Rules change: `u3` and `u5` are no longer blocked. `a2` now joins the older profile of
    email `1` through `u3` (its profile merges into it), while its phone goes with `u5` (the
    limit of one user id refuses the links between the two): the same old profile is split
    and merged in one run. A layer applying the publication in order must meet the split
    while that id is still live, before the merge takes it away."""
    with fresh_warehouse() as wh:
        EventWriter(wh).write(
            [
                Ev([("user_id", "3"), ("email", "1")]),
                Ev([("user_id", "3"), ("anonymous_id", "2")]),
                Ev([("phone", "1"), ("anonymous_id", "2"), ("user_id", "5")]),
            ]
        )
        resolve(wh, IdentityRules(blocked_patterns=["[35]"]))
        older = service.lookup(wh, kind="email", value="1")
        both = service.lookup(wh, kind="phone", value="1")
        assert service.lookup(wh, kind="anonymous_id", value="2") == both
        assert None not in (older, both)
        assert older != both
        consumer = _Consumer()
        consumer.catch_up(wh)
        assert resolve(wh, IdentityRules(blocked_patterns=[])).mode == "full"
        rows = service.merges_since(wh, after_seq=0)
        phone = service.lookup(wh, kind="phone", value="1")
        assert list(rows.select("kind", "from_profile_id", "to_profile_id").iter_rows()) == [
            ("split", both, phone),
            ("merge", both, older),
        ]
        assert service.lookup(wh, kind="anonymous_id", value="2") == older
        consumer.catch_up(wh)
        _assert_equals_full_rebuild(wh, IdentityRules(blocked_patterns=[]))
