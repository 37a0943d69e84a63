"""Profiles: identifiers by kind, activity span and traits by survivorship."""

from __future__ import annotations

from datetime import datetime

import orjson

from cdp.warehouse import Query, Warehouse
from identity import service
from identity.rules import IdentityRules
from tests.identity.conftest import Ev, EventWriter, resolve


def _profile_row(warehouse: Warehouse, kind: str, value: str) -> dict[str, object]:
    pid = service.lookup(warehouse, kind=kind, value=value)
    frame = warehouse.run(Query("SELECT * FROM profiles WHERE profile_id = $p", {"p": pid}))
    assert frame.height == 1
    row = frame.row(0, named=True)
    row["identifiers"] = orjson.loads(row["identifiers"])
    row["traits"] = orjson.loads(row["traits"])
    return row


def test_profile_row_lists_identifiers_by_kind_and_activity_span(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1"), ("email", "a@x.com")], at=datetime(2026, 3, 1)),
            Ev([("email", "a@x.com"), ("email", "b@x.com")], at=datetime(2026, 2, 1)),
            Ev([("user_id", "u1")], type="track", event="Order", at=datetime(2026, 4, 1)),
        ]
    )
    resolve(warehouse)
    row = _profile_row(warehouse, "user_id", "u1")
    assert row["identifiers"] == {"email": ["a@x.com", "b@x.com"], "user_id": ["u1"]}
    assert row["first_seen"] == datetime(2026, 2, 1)
    assert row["last_seen"] == datetime(2026, 4, 1)
    assert row["event_count"] == 3


def test_trait_takes_the_most_recent_non_null_value(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("user_id", "u1")], traits={"city": "Lyon", "age": 30}, at=datetime(2026, 1, 1)),
            Ev([("user_id", "u1")], traits={"city": "Paris"}, at=datetime(2026, 3, 1)),
            Ev([("user_id", "u1")], traits={"city": None, "vip": True}, at=datetime(2026, 4, 1)),
            # Arrives later but happened earlier: recency is the event time.
            Ev([("user_id", "u1")], traits={"city": "Nice"}, at=datetime(2026, 2, 1)),
        ]
    )
    resolve(warehouse)
    assert _profile_row(warehouse, "user_id", "u1")["traits"] == {
        "city": "Paris",
        "age": 30,
        "vip": True,
    }


def test_trait_tie_on_time_goes_to_the_later_event_in_both_paths(
    warehouse: Warehouse, events: EventWriter
) -> None:
    at = datetime(2026, 5, 1)
    events.write(
        [
            Ev([("user_id", "u1")], traits={"city": "Lyon"}, at=at),
            Ev([("user_id", "u1")], traits={"city": "Paris"}, at=at),
            Ev([("user_id", "u1")], traits={"city": "Nice"}, at=datetime(2026, 4, 1)),
        ]
    )
    resolve(warehouse)
    assert _profile_row(warehouse, "user_id", "u1")["traits"] == {"city": "Paris"}
    resolve(warehouse, full=True)
    assert _profile_row(warehouse, "user_id", "u1")["traits"] == {"city": "Paris"}


def test_trait_keys_that_look_like_json_paths_are_kept_as_keys(
    warehouse: Warehouse, events: EventWriter
) -> None:
    # json_extract read "/x" as a JSON pointer (the trait was lost) and failed on "$y".
    traits = {"a.b": 1, "/x": 2, "$y": 3, "q r": None, "z": [1, {"k": "v"}]}
    events.write([Ev([("user_id", "u1")], traits=traits)])
    resolve(warehouse)
    expected = {"a.b": 1, "/x": 2, "$y": 3, "z": [1, {"k": "v"}]}
    assert _profile_row(warehouse, "user_id", "u1")["traits"] == expected
    resolve(warehouse, full=True)
    assert _profile_row(warehouse, "user_id", "u1")["traits"] == expected


def test_source_priority_wins_over_recency_for_its_trait(
    warehouse: Warehouse, events: EventWriter
) -> None:
    rules = IdentityRules(trait_source_priority={"birth_date": ["crm"]})
    events.write(
        [
            Ev([("email", "a@x.com")], traits={"birth_date": "1980-01-01"}, source="crm"),
            Ev([("email", "a@x.com")], traits={"birth_date": "1999-09-09", "city": "Lyon"}),
        ]
    )
    resolve(warehouse, rules)
    traits = _profile_row(warehouse, "email", "a@x.com")["traits"]
    assert traits == {"birth_date": "1980-01-01", "city": "Lyon"}


def test_new_events_refresh_traits_without_new_links(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write([Ev([("user_id", "u1")], traits={"tier": "silver"})])
    resolve(warehouse)
    events.write([Ev([("user_id", "u1")], traits={"tier": "gold"})])
    resolve(warehouse)
    row = _profile_row(warehouse, "user_id", "u1")
    assert row["traits"] == {"tier": "gold"}
    assert row["event_count"] == 2


def test_merge_removes_the_merged_away_row_and_unites_traits(
    warehouse: Warehouse, events: EventWriter
) -> None:
    events.write(
        [
            Ev([("email", "a@x.com")], traits={"city": "Lyon"}),
            Ev([("phone", "+33612345678")], traits={"name": "Ana"}),
        ]
    )
    resolve(warehouse)
    events.write([Ev([("email", "a@x.com"), ("phone", "+33612345678")])])
    resolve(warehouse)
    rows = warehouse.run(Query("SELECT profile_id, traits FROM profiles"))
    assert rows.height == 1
    assert orjson.loads(rows["traits"][0]) == {"city": "Lyon", "name": "Ana"}
