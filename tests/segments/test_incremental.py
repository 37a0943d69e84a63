"""Incremental membership refresh gives exactly what a full refresh gives, history included."""

from __future__ import annotations

import random
from datetime import timedelta
from typing import Any

from cdp.config import SegmentsSettings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from segments import service
from tests.segments.conftest import NOW, Ev, resolve, write_events
from tests.segments.data import CATEGORIES, COUNTRIES, shop_events

SETTINGS = SegmentsSettings()
D = timedelta(days=1)

# Per-profile rules (incremental) and, last, two that read the clock (always full).
RULES: list[dict[str, Any]] = [  # Any: rule JSON
    {"field": "traits.country", "op": "in", "value": ["FR", "ES"]},
    {
        "event": "Order Completed",
        "where": [{"property": "category", "op": "eq", "value": "shoes"}],
        "count": {"op": "at_least", "value": 2},
    },
    {
        "all": [
            {"field": "attributes.orders_count", "op": "gte", "value": 2},
            {"not": {"field": "traits.vip", "op": "eq", "value": True}},
        ]
    },
    {
        "any": [
            {"field": "attributes.spend_total", "op": "gt", "value": 400},
            {
                "event": "Product Viewed",
                "performed": False,
                "since": (NOW - 400 * D).isoformat(),
                "until": (NOW + 30 * D).isoformat(),
            },
        ]
    },
    {
        "event": "Order Completed",
        "count": {"op": "exactly", "value": 1},
        "where": [{"property": "revenue", "op": "gte", "value": 50}],
    },
    {"field": "profile.event_count", "op": "between", "value": [3, 12]},
    {"event": "Product Viewed", "last_days": 200},
    {"field": "attributes.orders_365d", "op": "gte", "value": 1},
]


def _random_changes(rng: random.Random, step: int, people: int) -> list[Ev]:
    """New orders and views for existing people, new people, trait changes, and anonymous
    visitors who later log in (their profile merges into the known one)."""
    evs: list[Ev] = []
    at = NOW - rng.randint(0, 500) * D
    for _ in range(rng.randint(1, 6)):
        user = f"u{rng.randrange(people)}"
        evs.append(
            Ev(
                user,
                "Order Completed",
                at=at,
                properties={
                    "order_id": f"s{step}-{len(evs)}",
                    "category": rng.choice(CATEGORIES),
                    "revenue": rng.randint(5, 300),
                },
            )
        )
    for _ in range(rng.randint(0, 4)):
        user = f"u{rng.randrange(people)}"
        evs.append(Ev(user, "Product Viewed", at=at, properties={"category": "hats"}))
    for _ in range(rng.randint(0, 3)):
        user = f"u{rng.randrange(people)}"
        country = rng.choice(COUNTRIES)
        traits: dict[str, object] = {"vip": rng.random() < 0.5}
        if country:
            traits["country"] = country
        evs.append(Ev(user, type="identify", at=NOW - D, traits=traits))
    for k in range(rng.randint(0, 2)):
        evs.append(Ev(f"new{step}-{k}", type="identify", at=NOW - D, traits={"country": "FR"}))
    # An anonymous visitor shops; at the next step they may log in as a known person with
    # the same email, and their profile merges into that person's.
    evs.append(
        Ev(
            f"anon{step}",
            "Order Completed",
            kind="anonymous_id",
            email=f"anon{step}@shop.test",
            properties={"order_id": f"a{step}", "category": "shoes", "revenue": 60},
        )
    )
    if step > 1 and rng.random() < 0.7:
        evs.append(
            Ev(f"u{rng.randrange(people)}", type="identify", email=f"anon{step - 1}@shop.test")
        )
    return evs


def _members(warehouse: Warehouse, segment_id: str) -> set[str]:
    rows = warehouse.rows(
        Query("SELECT profile_id FROM segment_membership WHERE segment_id = $s", {"s": segment_id})
    )
    return {str(r[0]) for r in rows}


def _changes(warehouse: Warehouse, refresh_id: int) -> set[tuple[str, str]]:
    rows = warehouse.rows(
        Query(
            "SELECT profile_id, kind FROM segment_events WHERE refresh_id = $r", {"r": refresh_id}
        )
    )
    return {(str(p), str(k)) for p, k in rows}


def test_incremental_refresh_equals_full_refresh_over_random_changes(
    db: Database, warehouse: Warehouse
) -> None:
    rng = random.Random(2026)
    values_rng = random.Random(11)
    people = 60
    write_events(warehouse, shop_events(people, seed=3))
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
    service.refresh_catalog(warehouse)
    pairs = []
    with db.begin() as session:
        for i, rule in enumerate(RULES):
            ids = [
                service.create_segment(
                    session,
                    warehouse,
                    name=f"{mode}{i}",
                    description=None,
                    rule=rule,
                    refresh_minutes=None,
                    settings=SETTINGS,
                    actor=None,
                ).id
                for mode in ("inc", "full")
            ]
            pairs.append((ids[0], ids[1]))
    modes: dict[int, list[str]] = {i: [] for i in range(len(RULES))}
    evaluated: list[tuple[int, int]] = []
    for step in range(10):
        if step:
            write_events(warehouse, _random_changes(rng, step, people))
            resolve(warehouse)
            # Attributes lag identity: refreshed only now and then.
            if rng.random() < 0.4:
                with db.begin() as session:
                    service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
                service.refresh_event_map(warehouse)
            service.refresh_catalog(warehouse)
            # Property values are materialised now and then (a separate generator, so the
            # changes are those of the rounds above): filters read them up to their mark and
            # the JSON of the events after it.
            if values_rng.random() < 0.5:
                service.refresh_property_values(warehouse, settings=SETTINGS, now=NOW)
        for i, (inc_id, full_id) in enumerate(pairs):
            at = NOW + step * timedelta(minutes=1)
            with db.begin() as session:
                inc = service.refresh_segment(
                    session, warehouse, segment_id=inc_id, settings=SETTINGS, now=at
                )
                full = service.refresh_segment(
                    session, warehouse, segment_id=full_id, settings=SETTINGS, now=at, full=True
                )
            modes[i].append(inc.mode)
            assert full.mode == "full"
            assert _members(warehouse, inc_id) == _members(warehouse, full_id), (step, i)
            assert _changes(warehouse, inc.refresh_id) == _changes(warehouse, full.refresh_id)
            assert (inc.size, inc.entries, inc.exits) == (full.size, full.entries, full.exits)
            if inc.mode == "incremental":
                evaluated.append((inc.evaluated, full.evaluated))
    # Per-profile rules refresh incrementally after their first refresh (a rule whose compiled
    # condition changes, e.g. a trait whose inferred type changed, falls back to full); rules
    # on the clock (last_days, clock-dependent attributes) always refresh in full.
    for i in range(len(RULES) - 2):
        assert modes[i][0] == "full"
        assert modes[i].count("incremental") >= 7, (i, modes[i])
    assert set(modes[len(RULES) - 2]) == {"full"}
    assert set(modes[len(RULES) - 1]) == {"full"}
    # Incremental refreshes evaluated a fraction of the profiles.
    assert all(inc < full for inc, full in evaluated)
    # Something changed along the way, so the comparison means something.
    sizes = warehouse.rows(Query("SELECT count(DISTINCT size) FROM segment_refreshes"))
    assert sizes[0][0] > 3


def test_a_new_rule_version_refreshes_in_full(db: Database, warehouse: Warehouse) -> None:
    write_events(warehouse, shop_events(30, seed=4))
    resolve(warehouse)
    service.refresh_catalog(warehouse)
    with db.begin() as session:
        segment = service.create_segment(
            session,
            warehouse,
            name="fr",
            description=None,
            rule=RULES[0],
            refresh_minutes=None,
            settings=SETTINGS,
            actor=None,
        )
    runs = []
    for changes in ({}, {}, {"rule": {"field": "traits.country", "op": "eq", "value": "DE"}}, {}):
        with db.begin() as session:
            if changes:
                service.update_segment(
                    session,
                    warehouse,
                    segment_id=segment.id,
                    changes=changes,
                    settings=SETTINGS,
                    actor=None,
                )
        with db.begin() as session:
            runs.append(
                service.refresh_segment(
                    session, warehouse, segment_id=segment.id, settings=SETTINGS, now=NOW
                )
            )
    assert [r.mode for r in runs] == ["full", "incremental", "full", "incremental"]
    assert runs[1].evaluated == 0  # nothing changed since
    assert runs[2].size == len(
        warehouse.rows(Query("SELECT 1 FROM profiles WHERE traits->>'country' = 'DE'"))
    )


def test_attribute_rules_read_the_attribute_table_alone_only_while_it_is_current(
    db: Database, warehouse: Warehouse
) -> None:
    write_events(warehouse, [*shop_events(30, seed=4), Ev("anon", kind="anonymous_id")])
    resolve(warehouse)
    with db.begin() as session:
        service.refresh_attributes(session, warehouse, settings=SETTINGS, now=NOW)
    rule = service.parse_rule({"field": "attributes.orders_count", "op": "gte", "value": 0})

    def compiled() -> Query:
        with db.begin() as session:
            return service.compile_segment_rule(
                session, warehouse, rule=rule, settings=SETTINGS, now=NOW
            )

    query = compiled()
    assert "FROM profile_attributes a" in query.sql
    profiles = {str(r[0]) for r in warehouse.rows(Query("SELECT profile_id FROM profiles"))}
    assert set(warehouse.run(query)["profile_id"]) == profiles
    # Identity runs: a new person (no attributes yet), and the anonymous visitor logs in as u1.
    write_events(
        warehouse,
        [
            Ev("zed", type="identify"),
            Ev("u1", type="identify", email="x@y.z"),
            Ev("anon", email="x@y.z", kind="anonymous_id"),
        ],
    )
    resolve(warehouse)
    query = compiled()
    assert "FROM profiles p" in query.sql
    live = {str(r[0]) for r in warehouse.rows(Query("SELECT profile_id FROM profiles"))}
    assert live - profiles  # zed
    assert profiles - live  # the anonymous profile, merged away
    assert set(warehouse.run(query)["profile_id"]) == live & profiles
