"""An incremental run rewrites only the raw components its events reach: the other profiles'
rows, nodes and decisions are left exactly as they were (same rows, same values)."""

from __future__ import annotations

from cdp.warehouse import Query, Warehouse
from identity import service
from identity.rules import IdentityRules
from tests.identity.conftest import Ev, EventWriter, resolve

RULES = IdentityRules(limits={"user_id": 1})
Row = tuple[object, ...]


def _rows(warehouse: Warehouse, sql: str) -> dict[object, set[Row]]:
    """Rows with their DuckDB rowid (a rewritten row gets a new one), keyed by the first
    column selected after it (profile id, or component id)."""
    grouped: dict[object, set[Row]] = {}
    for row in warehouse.rows(Query(sql)):
        grouped.setdefault(row[1], set()).add(tuple(row))
    return grouped


def _profiles(warehouse: Warehouse) -> dict[object, set[Row]]:
    return _rows(warehouse, "SELECT rowid, profile_id, * FROM profiles")


def _nodes(warehouse: Warehouse) -> dict[object, set[Row]]:
    return _rows(warehouse, "SELECT rowid, component_id, * FROM identity_nodes")


def _decisions(warehouse: Warehouse) -> dict[object, set[Row]]:
    return _rows(warehouse, "SELECT rowid, component_id, * FROM identity_decisions")


def _pid(warehouse: Warehouse, kind: str, value: str) -> str:
    pid = service.lookup(warehouse, kind=kind, value=value)
    assert pid is not None
    return pid


def _component(warehouse: Warehouse, kind: str, value: str) -> int:
    return int(
        warehouse.scalar(
            Query(
                "SELECT component_id FROM identity_nodes WHERE kind = $k AND value = $v",
                {"k": kind, "v": value},
            )
        )
    )


def _untouched(
    before: dict[object, set[Row]], after: dict[object, set[Row]], touched: set[object]
) -> None:
    assert {k: v for k, v in after.items() if k not in touched} == {
        k: v for k, v in before.items() if k not in touched
    }


def test_an_incremental_run_rewrites_only_the_components_its_events_reach(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            # A: three identifiers; B: two. Both also carry a blocked email (no link).
            Ev([("user_id", "u1"), ("email", "a@x.com"), ("email", "unknown")], {"n": 1}),
            Ev([("anonymous_id", "a1"), ("email", "a@x.com")], {"n": 2}),
            Ev([("user_id", "u2"), ("email", "b@x.com"), ("email", "unknown")], {"n": 3}),
            # C: one raw component, two profiles (the limit of one user id refuses a link).
            Ev([("user_id", "u4"), ("email", "s@x.com")], {"n": 4}),
            Ev([("user_id", "u5"), ("email", "s@x.com")], {"n": 5}),
            # D: alone.
            Ev([("anonymous_id", "a9")], {"n": 6}),
        ]
    )
    resolve(warehouse, RULES)
    a, b = _pid(warehouse, "user_id", "u1"), _pid(warehouse, "user_id", "u2")
    c4, c5 = _pid(warehouse, "user_id", "u4"), _pid(warehouse, "user_id", "u5")
    d = _pid(warehouse, "anonymous_id", "a9")
    assert len({a, b, c4, c5, d}) == 5
    comp_a, comp_c = _component(warehouse, "user_id", "u1"), _component(warehouse, "user_id", "u4")
    assert comp_c == _component(warehouse, "user_id", "u5")
    profiles, nodes, decisions = _profiles(warehouse), _nodes(warehouse), _decisions(warehouse)
    merges = service.merges_since(warehouse, after_seq=0).height

    # A new link inside A and a new identifier on it: A alone is recomputed.
    events.write([Ev([("user_id", "u1"), ("phone", "+33600000001"), ("anonymous_id", "a1")])])
    result = resolve(warehouse, RULES)
    assert (result.events, result.new_identifiers, result.affected_identifiers) == (1, 1, 4)
    assert (result.profiles_written, result.merges, result.splits) == (1, 0, 0)
    assert _pid(warehouse, "phone", "+33600000001") == a
    _untouched(profiles, _profiles(warehouse), {a})
    _untouched(nodes, _nodes(warehouse), {comp_a})
    _untouched(decisions, _decisions(warehouse), {comp_a})
    assert service.merges_since(warehouse, after_seq=0).height == merges

    # An event of C's second profile: the whole raw component C (both its profiles, the
    # refused link re-decided) is recomputed, nothing else.
    profiles, nodes, decisions = _profiles(warehouse), _nodes(warehouse), _decisions(warehouse)
    events.write([Ev([("user_id", "u5"), ("device_id", "dev5")], {"n": 7})])
    result = resolve(warehouse, RULES)
    assert (result.events, result.new_identifiers, result.affected_identifiers) == (1, 1, 4)
    assert (result.profiles_written, result.refused_links) == (2, 1)
    _untouched(profiles, _profiles(warehouse), {c4, c5})
    # The component's id is its smallest node id: the new device's here.
    new_c = _component(warehouse, "device_id", "dev5")
    assert new_c == _component(warehouse, "user_id", "u4")
    _untouched(nodes, _nodes(warehouse), {comp_c, new_c})
    _untouched(decisions, _decisions(warehouse), {comp_c, new_c})

    # Events re-sending known identifiers without a new link: no component is recomputed, only
    # the profile whose events (traits, last seen) changed is rewritten.
    profiles, nodes, decisions = _profiles(warehouse), _nodes(warehouse), _decisions(warehouse)
    events.write([Ev([("user_id", "u2"), ("email", "b@x.com")], {"n": 8})])
    result = resolve(warehouse, RULES)
    assert (result.events, result.affected_identifiers, result.profiles_written) == (1, 0, 1)
    _untouched(profiles, _profiles(warehouse), {b})
    assert service.get_profile(warehouse, profile_id=b).traits == {"n": 8}
    comp_b = _component(warehouse, "user_id", "u2")
    _untouched(nodes, _nodes(warehouse), {comp_b})
    assert _decisions(warehouse) == decisions

    # A blocked value shared by A and B seen again with A: neither B nor the others move.
    profiles = _profiles(warehouse)
    events.write([Ev([("email", "unknown"), ("user_id", "u1")])])
    result = resolve(warehouse, RULES)
    assert (result.events, result.affected_identifiers, result.profiles_written) == (1, 0, 1)
    _untouched(profiles, _profiles(warehouse), {a})
