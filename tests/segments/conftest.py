"""Helpers of the segments tests: events written straight into the warehouse, real resolution."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import polars as pl
import pytest

from cdp.config import Settings
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules

# Tests run with a fixed "now" so relative windows are deterministic.
NOW = datetime(2026, 6, 15, 12, 0, 0)


@dataclass
class Ev:
    """One event to write."""

    user: str
    event: str | None = None
    type: str = "track"
    at: datetime = NOW - timedelta(days=1)
    properties: dict[str, Any] = field(default_factory=dict)  # Any: JSON values
    traits: dict[str, Any] | None = None  # Any: JSON values
    email: str | None = None
    kind: str = "user_id"  # the kind of `user`'s identifier


def write_events(warehouse: Warehouse, events: Sequence[Ev]) -> None:
    """Append events and their identifiers (user_id, email) in bulk."""
    start = int(warehouse.scalar(Query("SELECT coalesce(max(event_id), 0) FROM events")))
    ids = list(range(start + 1, start + 1 + len(events)))
    rows = pl.DataFrame(
        {
            "event_id": ids,
            "message_id": [f"m{i}" for i in ids],
            "source_id": ["web"] * len(events),
            "batch_id": [1] * len(events),
            "type": [e.type for e in events],
            "event": [e.event for e in events],
            "user_id": [e.user if e.kind == "user_id" else None for e in events],
            "anonymous_id": [e.user if e.kind == "anonymous_id" else None for e in events],
            "timestamp": [e.at for e in events],
            "received_at": [e.at for e in events],
            "properties": [orjson.dumps(e.properties).decode() for e in events],
            "traits": [orjson.dumps(e.traits).decode() if e.traits else None for e in events],
            "context": ["{}"] * len(events),
        },
        schema_overrides={
            "event_id": pl.Int64,
            "batch_id": pl.Int64,
            "anonymous_id": pl.String,
            "event": pl.String,
        },
    )
    idents = pl.DataFrame(
        [(i, e.kind, e.user) for e, i in zip(events, ids, strict=True)]
        + [(i, "email", e.email) for e, i in zip(events, ids, strict=True) if e.email],
        schema={"event_id": pl.Int64, "kind": pl.String, "value": pl.String},
        orient="row",
    )
    with warehouse.transaction() as cur:
        cur.register("ev_frame", rows)
        cur.execute("INSERT INTO events SELECT * FROM ev_frame")
        cur.unregister("ev_frame")
        cur.register("ei_frame", idents)
        cur.execute("INSERT INTO event_identifiers SELECT * FROM ei_frame")
        cur.unregister("ei_frame")


def resolve(warehouse: Warehouse) -> None:
    """Build real profiles with identity's resolver."""
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())


def profile_of(warehouse: Warehouse, user: str) -> str:
    """The profile id of a user id."""
    pid = identity_service.lookup(warehouse, kind="user_id", value=user)
    assert pid is not None
    return pid


@pytest.fixture
def seeded(warehouse: Warehouse) -> Warehouse:
    """A small shop: purchases, refunds, visits and traits for a handful of people."""
    d = timedelta(days=1)
    evs = [
        Ev(
            "alice",
            type="identify",
            at=NOW - 900 * d,
            traits={"country": "FR", "age": 34, "birthday": "1990-06-20", "vip": True},
        ),
        Ev(
            "alice",
            "Order Completed",
            at=NOW - 800 * d,
            properties={"order_id": "a1", "revenue": 100.0, "category": "shoes"},
        ),
        Ev(
            "alice",
            "Order Completed",
            at=NOW - 10 * d,
            properties={"order_id": "a2", "total": 50, "category": "bags"},
        ),
        Ev(
            "alice",
            "Order Completed",
            at=NOW - 5 * d,
            properties={"order_id": "a3", "revenue": 30.0, "category": "shoes"},
        ),
        Ev("alice", "Order Refunded", at=NOW - 4 * d, properties={"order_id": "a3"}),
        Ev("alice", None, type="page", at=NOW - 3 * d, properties={"path": "/"}),
        Ev("alice", None, type="page", at=NOW - 3 * d + timedelta(hours=1)),
        Ev(
            "bob",
            type="identify",
            at=NOW - 400 * d,
            traits={"country": "DE", "age": 51, "birthday": "1975-01-02"},
        ),
        Ev(
            "bob",
            "Order Completed",
            at=NOW - 200 * d,
            properties={"order_id": "b1", "revenue": 80.0, "category": "bags"},
        ),
        Ev("bob", "Order Refunded", at=NOW - 190 * d, properties={"order_id": "b1", "revenue": 30}),
        Ev("bob", None, type="screen", at=NOW - 2 * d),
        Ev(
            "carol",
            type="identify",
            at=NOW - 30 * d,
            traits={"country": "FR", "age": 22, "email_opt_in": False},
            email="c@x.io",
        ),
        Ev("carol", "Product Viewed", at=NOW - 29 * d, properties={"category": "shoes"}),
        Ev("carol", "Product Viewed", at=NOW - 28 * d, properties={"category": "shoes"}),
        Ev("carol", "Product Viewed", at=NOW - 27 * d, properties={"category": "hats"}),
        Ev("dave", type="identify", at=NOW - 2 * d, traits={"country": "ES"}),
    ]
    write_events(warehouse, evs)
    resolve(warehouse)
    return warehouse
