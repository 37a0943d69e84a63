"""Helpers of the identity tests: write events and identifiers straight into the warehouse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
import polars as pl
import pytest

from cdp.warehouse import Query, Warehouse
from identity import service
from identity.rules import IdentityRules

T0 = datetime(2026, 1, 1)

Ident = tuple[str, str]


@dataclass
class Ev:
    """One event to write: its identifiers and optionally traits, source and time."""

    ids: Sequence[Ident]
    traits: dict[str, Any] | None = None  # Any: JSON values
    source: str = "web"
    type: str = "identify"
    event: str | None = None
    at: datetime | None = None
    properties: dict[str, Any] = field(default_factory=dict)  # Any: JSON values


class EventWriter:
    """Appends events in bulk (Polars frames), numbering them after the current maximum."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse
        # Like ingestion's counter, ids never go back, even after an erasure deleted the last.
        self.last = 0

    def write(self, events: Sequence[Ev]) -> list[int]:
        """Write events; returns their event ids."""
        start = int(self.warehouse.scalar(Query("SELECT coalesce(max(event_id), 0) FROM events")))
        start = max(start, self.last)
        ids = list(range(start + 1, start + 1 + len(events)))
        self.last = start + len(events)
        rows = pl.DataFrame(
            {
                "event_id": ids,
                "message_id": [f"m{i}" for i in ids],
                "source_id": [e.source for e in events],
                "batch_id": [1] * len(events),
                "type": [e.type for e in events],
                "event": [e.event for e in events],
                "user_id": [dict(e.ids).get("user_id") for e in events],
                "anonymous_id": [dict(e.ids).get("anonymous_id") for e in events],
                "timestamp": [
                    e.at or T0 + timedelta(minutes=i) for e, i in zip(events, ids, strict=True)
                ],
                "received_at": [T0 + timedelta(minutes=i) for i in ids],
                "properties": [orjson.dumps(e.properties).decode() for e in events],
                "traits": [
                    orjson.dumps(e.traits).decode() if e.traits is not None else None
                    for e in events
                ],
                "context": ["{}"] * len(events),
            },
            schema_overrides={"event_id": pl.Int64, "batch_id": pl.Int64},
        )
        idents = pl.DataFrame(
            [(i, k, v) for e, i in zip(events, ids, strict=True) for k, v in e.ids],
            schema={"event_id": pl.Int64, "kind": pl.String, "value": pl.String},
            orient="row",
        )
        with self.warehouse.transaction() as cur:
            cur.register("ev_frame", rows)
            cur.execute("INSERT INTO events SELECT * FROM ev_frame")
            cur.unregister("ev_frame")
            cur.register("ei_frame", idents)
            cur.execute("INSERT INTO event_identifiers SELECT * FROM ei_frame")
            cur.unregister("ei_frame")
        return ids


@pytest.fixture
def events(warehouse: Warehouse) -> EventWriter:
    """A writer of events into the test warehouse."""
    return EventWriter(warehouse)


def partition(warehouse: Warehouse) -> set[frozenset[Ident]]:
    """The profiles as sets of identifiers (ids ignored), for comparing resolutions."""
    frame = warehouse.run(
        Query("SELECT kind, value, profile_id FROM identity_nodes WHERE profile_id IS NOT NULL")
    )
    groups: dict[str, set[Ident]] = {}
    for kind, value, pid in frame.iter_rows():
        groups.setdefault(pid, set()).add((kind, value))
    return {frozenset(g) for g in groups.values()}


def resolve(
    warehouse: Warehouse, rules: IdentityRules | None = None, *, full: bool = False
) -> service.ResolveResult:
    """Run the resolver with default (or given) rules."""
    from cdp.config import Settings

    return service.resolve(
        warehouse, settings=Settings(), rules=rules or IdentityRules(), full=full
    )
