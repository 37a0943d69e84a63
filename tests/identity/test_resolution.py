"""Resolution: profiles are the components of the identifier graph, under the rules."""

from __future__ import annotations

import logging

import polars as pl
import pytest

from cdp.errors import NotFound
from cdp.warehouse import Query, Warehouse
from identity import service
from identity.rules import IdentityRules
from tests.identity.conftest import Ev, EventWriter, partition, resolve


def _pid(warehouse: Warehouse, kind: str, value: str) -> str:
    pid = service.lookup(warehouse, kind=kind, value=value)
    assert pid is not None, (kind, value)
    return pid


def test_identifiers_seen_together_form_one_profile(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "a@x.com")]),
            Ev([("email", "a@x.com"), ("phone", "+33612345678")]),
            Ev([("email", "b@x.com")]),
        ]
    )
    result = resolve(warehouse)
    assert result.new_profiles == 2
    assert _pid(warehouse, "phone", "+33612345678") == _pid(warehouse, "user_id", "u1")
    assert _pid(warehouse, "email", "b@x.com") != _pid(warehouse, "user_id", "u1")
    assert partition(warehouse) == {
        frozenset({("user_id", "u1"), ("email", "a@x.com"), ("phone", "+33612345678")}),
        frozenset({("email", "b@x.com")}),
    }


def test_alias_chain_links_anonymous_ids_to_the_user(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("anonymous_id", "a1")], type="track", event="Viewed"),
            Ev([("anonymous_id", "a1"), ("anonymous_id", "a2")], type="alias"),
            Ev([("anonymous_id", "a2"), ("user_id", "u9")], type="alias"),
            Ev([("anonymous_id", "a3"), ("user_id", "u9")], type="alias"),
        ]
    )
    resolve(warehouse)
    pid = _pid(warehouse, "user_id", "u9")
    assert {_pid(warehouse, "anonymous_id", a) for a in ("a1", "a2", "a3")} == {pid}


def test_chain_of_ten_thousand_identifiers_resolves_to_one_profile(
    warehouse: Warehouse, events: EventWriter
) -> None:
    n = 10_000
    events.write([Ev([("custom", f"c{i}"), ("custom", f"c{i + 1}")]) for i in range(n - 1)])
    resolve(warehouse)
    count = warehouse.scalar(
        Query("SELECT count(DISTINCT profile_id), count(*) FROM identity_nodes")
    )
    assert count == 1
    assert warehouse.rows(Query("SELECT count(*) FROM identity_nodes"))[0][0] == n


def test_per_kind_limit_keeps_the_later_user_id_separate_and_records_why(
    warehouse: Warehouse, events: EventWriter
) -> None:
    first, second = events.write(
        [
            Ev([("user_id", "u1"), ("email", "shared@x.com")]),
            Ev([("user_id", "u2"), ("email", "shared@x.com"), ("phone", "+33611111111")]),
        ]
    )
    resolve(warehouse)
    assert _pid(warehouse, "email", "shared@x.com") == _pid(warehouse, "user_id", "u1")
    assert _pid(warehouse, "user_id", "u2") != _pid(warehouse, "user_id", "u1")
    assert _pid(warehouse, "phone", "+33611111111") == _pid(warehouse, "user_id", "u2")
    decisions = warehouse.run(Query("SELECT decision, event_id, detail FROM identity_decisions"))
    assert set(decisions["decision"]) == {"limit"}
    assert set(decisions["event_id"]) == {second}
    assert all("1 user_id" in d for d in decisions["detail"])
    assert first < second


def test_limit_is_respected_by_every_profile(warehouse: Warehouse, events: EventWriter) -> None:
    rules = IdentityRules(limits={"email": 2})
    events.write([Ev([("device_id", "d1"), ("email", f"e{i}@x.com")]) for i in range(5)])
    resolve(warehouse, rules)
    per_profile = warehouse.run(
        Query(
            "SELECT profile_id, count(*) AS emails FROM identity_nodes"
            " WHERE kind = 'email' GROUP BY profile_id"
        )
    )
    assert per_profile["emails"].max() == 2
    assert _pid(warehouse, "email", "e0@x.com") == _pid(warehouse, "device_id", "d1")
    assert _pid(warehouse, "email", "e1@x.com") == _pid(warehouse, "device_id", "d1")
    assert _pid(warehouse, "email", "e2@x.com") != _pid(warehouse, "device_id", "d1")


def test_blocked_value_never_merges(warehouse: Warehouse, events: EventWriter) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "test@test.com")]),
            Ev([("user_id", "u2"), ("email", "TEST@test.com")]),
            Ev([("user_id", "u3"), ("phone", "+000000")]),
            Ev([("user_id", "u4"), ("phone", "+000000")]),
        ]
    )
    resolve(warehouse)
    pids = {_pid(warehouse, "user_id", f"u{i}") for i in range(1, 5)}
    assert len(pids) == 4
    assert service.lookup(warehouse, kind="email", value="test@test.com") is None
    statuses = warehouse.run(
        Query("SELECT value, status FROM identity_nodes WHERE kind IN ('email', 'phone')")
    )
    assert set(statuses["status"]) == {"blocked"}


def test_value_linked_to_too_many_higher_priority_ids_is_capped_and_splits(
    warehouse: Warehouse, events: EventWriter
) -> None:
    rules = IdentityRules(auto_cap=3, limits={})
    events.write([Ev([("email", f"p{i}@x.com"), ("phone", "+33600000001")]) for i in range(3)])
    resolve(warehouse, rules)
    assert len(partition(warehouse)) == 1
    events.write([Ev([("email", "p3@x.com"), ("phone", "+33600000001")])])
    result = resolve(warehouse, rules)
    assert service.lookup(warehouse, kind="phone", value="+33600000001") is None
    assert len(partition(warehouse)) == 4
    assert result.splits == 2  # two old pieces leave the profile; p3 was never in it
    decision = warehouse.run(Query("SELECT decision, detail FROM identity_decisions"))
    assert decision["decision"].to_list() == ["capped"]
    assert "4 higher-priority" in decision["detail"][0]


def test_profile_keeps_its_id_as_it_grows(warehouse: Warehouse, events: EventWriter) -> None:
    events.write([Ev([("user_id", "u1"), ("email", "a@x.com")])])
    resolve(warehouse)
    pid = _pid(warehouse, "user_id", "u1")
    events.write([Ev([("email", "a@x.com"), ("phone", "+33612345678")])])
    result = resolve(warehouse)
    assert result.mode == "incremental"
    assert result.new_profiles == 0
    assert _pid(warehouse, "phone", "+33612345678") == pid


def test_merge_keeps_the_oldest_id_publishes_it_and_redirects(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("email", "a@x.com")]), Ev([("anonymous_id", "anon")])])
    resolve(warehouse)
    old, young = _pid(warehouse, "email", "a@x.com"), _pid(warehouse, "anonymous_id", "anon")
    (linking,) = events.write([Ev([("anonymous_id", "anon"), ("email", "a@x.com")])])
    result = resolve(warehouse)
    assert result.merges == 1
    assert _pid(warehouse, "anonymous_id", "anon") == old
    assert service.resolve_profile_id(warehouse, profile_id=young) == old
    assert service.resolve_profile_id(warehouse, profile_id=old) == old
    merges = service.merges_since(warehouse, after_seq=0)
    assert merges.select("seq", "kind", "from_profile_id", "to_profile_id").rows() == [
        (1, "merge", young, old)
    ]
    assert f"event {linking}" in merges["reason"][0]
    assert service.merges_since(warehouse, after_seq=1).height == 0


def test_redirects_follow_a_chain_of_merges(warehouse: Warehouse, events: EventWriter) -> None:
    events.write([Ev([("email", "a@x.com")]), Ev([("email", "b@x.com")])])
    resolve(warehouse)
    a, b = _pid(warehouse, "email", "a@x.com"), _pid(warehouse, "email", "b@x.com")
    events.write([Ev([("email", "c@x.com")])])
    resolve(warehouse)
    c = _pid(warehouse, "email", "c@x.com")
    events.write([Ev([("email", "b@x.com"), ("email", "c@x.com")])])
    resolve(warehouse)
    events.write([Ev([("email", "a@x.com"), ("email", "c@x.com")])])
    resolve(warehouse)
    assert {service.resolve_profile_id(warehouse, profile_id=p) for p in (a, b, c)} == {a}


def test_unknown_profile_id_is_not_found(warehouse: Warehouse) -> None:
    with pytest.raises(NotFound):
        service.resolve_profile_id(warehouse, profile_id="nope")


def test_event_profiles_maps_events_of_a_range(warehouse: Warehouse, events: EventWriter) -> None:
    e1, e2, e3 = events.write(
        [Ev([("user_id", "u1")]), Ev([("user_id", "u2")]), Ev([], type="track")]
    )
    resolve(warehouse)
    frame = service.event_profiles(warehouse, after_event_id=0)
    assert frame.columns == ["event_id", "profile_id"]
    assert frame["event_id"].to_list() == [e1, e2]
    assert frame["profile_id"].to_list() == [
        _pid(warehouse, "user_id", "u1"),
        _pid(warehouse, "user_id", "u2"),
    ]
    later = service.event_profiles(warehouse, after_event_id=e1, up_to_event_id=e3)
    assert later["event_id"].to_list() == [e2]


def test_event_belongs_to_its_most_trusted_identifier_profile(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("user_id", "u1"), ("email", "s@x.com")])])
    (second,) = events.write([Ev([("email", "s@x.com"), ("user_id", "u2")])])
    resolve(warehouse)
    frame = service.event_profiles(warehouse, after_event_id=second - 1)
    assert frame["profile_id"].to_list() == [_pid(warehouse, "user_id", "u2")]


def test_nothing_new_does_nothing(
    warehouse: Warehouse, events: EventWriter, caplog: pytest.LogCaptureFixture
) -> None:
    events.write([Ev([("user_id", "u1")])])
    with caplog.at_level(logging.DEBUG, logger="identity.resolver"):
        resolve(warehouse)
        again = resolve(warehouse)
    assert (again.events, again.affected_identifiers) == (0, 0)
    # Polled every few seconds: an idle run's line is DEBUG, a run that did something INFO.
    levels = [r.levelname for r in caplog.records if r.getMessage() == "identity resolved"]
    assert levels == ["INFO", "DEBUG"]


def test_changed_rules_trigger_a_full_rebuild(warehouse: Warehouse, events: EventWriter) -> None:
    events.write([Ev([("device_id", "d"), ("email", f"e{i}@x.com")]) for i in range(3)])
    resolve(warehouse)
    assert len(partition(warehouse)) == 1
    result = resolve(warehouse, IdentityRules(limits={"email": 1}))
    assert result.mode == "full"
    assert len(partition(warehouse)) == 3
    assert result.splits == 2


def test_full_rebuild_keeps_profile_ids(warehouse: Warehouse, events: EventWriter) -> None:
    events.write([Ev([("user_id", f"u{i}"), ("email", f"e{i}@x.com")]) for i in range(20)])
    resolve(warehouse)
    before = warehouse.run(Query("SELECT kind, value, profile_id FROM identity_nodes"))
    result = resolve(warehouse, full=True)
    after = warehouse.run(Query("SELECT kind, value, profile_id FROM identity_nodes"))
    assert result.new_profiles == 0
    assert before.sort("kind", "value").equals(after.sort("kind", "value"))
    assert service.merges_since(warehouse, after_seq=0).height == 0


def test_full_rebuild_stores_nodes_in_kind_value_order_and_lookups_find_them(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", f"u{i}"), ("email", f"e{i}@x.com"), ("email", "unknown")])
            for i in range(50)
        ]
    )
    resolve(warehouse, full=True)
    stored = warehouse.run(Query("SELECT node_id, kind, value, profile_id FROM identity_nodes"))
    assert stored.height == 101
    keys = list(zip(stored["kind"].to_list(), stored["value"].to_list(), strict=True))
    assert keys == sorted(keys)
    for row in stored.iter_rows(named=True):
        assert service.lookup(warehouse, kind=row["kind"], value=row["value"]) == row["profile_id"]
    assert service.lookup(warehouse, kind="email", value="unknown") is None
    assert _pid(warehouse, "email", "e7@x.com") == _pid(warehouse, "user_id", "u7")


def test_profiles_table_is_empty_for_unresolved_events(warehouse: Warehouse) -> None:
    resolve(warehouse)
    assert warehouse.run(Query("SELECT * FROM profiles")).height == 0
    assert isinstance(service.event_profiles(warehouse, after_event_id=0), pl.DataFrame)


def test_a_profile_whose_identifiers_come_back_gets_its_id_back(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("email", "ann@x.com"), ("phone", "+33600000001")], traits={"name": "Ann"}),
            Ev([("email", "bob@x.com")]),
        ]
    )
    resolve(warehouse)
    ann = _pid(warehouse, "email", "ann@x.com")
    before = service.get_profile(warehouse, profile_id=ann)
    # An admin blocks Ann's identifiers by mistake: her profile has none left.
    resolve(warehouse, IdentityRules(blocked_values=["ann@x.com", "+33600000001"]), full=True)
    assert service.lookup(warehouse, kind="email", value="ann@x.com") is None
    with pytest.raises(NotFound):
        service.get_profile(warehouse, profile_id=ann)
    # ... and lifts the block: Ann is Ann again, not a new person.
    resolve(warehouse, IdentityRules(), full=True)
    assert _pid(warehouse, "email", "ann@x.com") == ann
    assert _pid(warehouse, "phone", "+33600000001") == ann
    after = service.get_profile(warehouse, profile_id=ann)
    assert after.traits == {"name": "Ann"}
    assert after.created_at == before.created_at
    # Nothing was published: the id never changed hands.
    assert service.merges_since(warehouse, after_seq=0).height == 0
    # New events of hers resolve incrementally to the same id.
    events.write([Ev([("email", "ann@x.com")], traits={"city": "Lyon"})])
    resolve(warehouse)
    assert _pid(warehouse, "email", "ann@x.com") == ann
