"""Writing events with identifiers into the warehouse and resolving them, for loyalty tests."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import orjson
import polars as pl

from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from identity import service as identity_service
from identity.rules import IdentityRules
from segments import service as segments_service

Ident = tuple[str, str]


def write_events(
    warehouse: Warehouse,
    events: Sequence[tuple[Sequence[Ident], str | None, float]],
    *,
    traits: Sequence[dict[str, object] | None] | None = None,
    properties: Sequence[dict[str, object]] | None = None,
) -> None:
    """Append events `(identifiers, event name, order total)` after the current maximum id
    (with the profile traits each carries, if given)."""
    start = int(warehouse.scalar(Query("SELECT coalesce(max(event_id), 0) FROM events")))
    ids = list(range(start + 1, start + 1 + len(events)))
    at = [datetime(2026, 3, 2, 10) + timedelta(minutes=i) for i in ids]
    rows = pl.DataFrame(
        {
            "event_id": ids,
            "message_id": [f"m{i}" for i in ids],
            "source_id": ["web"] * len(ids),
            "batch_id": [1] * len(ids),
            "type": ["track"] * len(ids),
            "event": [name for _, name, _ in events],
            "user_id": [dict(idents).get("user_id") for idents, _, _ in events],
            "anonymous_id": [dict(idents).get("anonymous_id") for idents, _, _ in events],
            "timestamp": at,
            "received_at": at,
            "properties": [
                orjson.dumps({"total": total, **extra}).decode()
                for (_, _, total), extra in zip(
                    events, properties or [{}] * len(events), strict=True
                )
            ],
            "traits": [
                None if t is None else orjson.dumps(t).decode()
                for t in (traits or [None] * len(ids))
            ],
            "context": ["{}"] * len(ids),
        },
        schema_overrides={"event_id": pl.Int64, "batch_id": pl.Int64, "traits": pl.String},
    )
    idents = pl.DataFrame(
        [(i, k, v) for (e, _, _), i in zip(events, ids, strict=True) for k, v in e],
        schema={"event_id": pl.Int64, "kind": pl.String, "value": pl.String},
        orient="row",
    )
    with warehouse.transaction() as cur:
        cur.register("ev_frame", rows)
        cur.execute(
            "INSERT INTO events SELECT event_id, message_id, source_id, batch_id, type, event,"
            " user_id, anonymous_id, timestamp, received_at, properties::JSON, traits::JSON,"
            " context::JSON FROM ev_frame"
        )
        cur.unregister("ev_frame")
        cur.register("ei_frame", idents)
        cur.execute("INSERT INTO event_identifiers SELECT * FROM ei_frame")
        cur.unregister("ei_frame")


def resolve(warehouse: Warehouse) -> None:
    """Run identity resolution with the default rules."""
    identity_service.resolve(warehouse, settings=Settings(), rules=IdentityRules())


def profile_of(warehouse: Warehouse, kind: str, value: str) -> str:
    """The profile identity resolved for an identifier."""
    profile_id = identity_service.lookup(warehouse, kind=kind, value=value)
    assert profile_id is not None
    return profile_id


def french_segment(db: Database, warehouse: Warehouse, settings: Settings) -> str:
    """A saved segment of the profiles whose trait `country` is FR, materialised by the
    segments package (exactly one such profile is expected)."""
    with db.begin() as session:
        segment = segments_service.create_segment(
            session,
            warehouse,
            name="French",
            description=None,
            rule={"field": "traits.country", "op": "eq", "value": "FR"},
            refresh_minutes=None,
            settings=settings.segments,
            actor=None,
        )
        refreshed = segments_service.refresh_segment(
            session, warehouse, segment_id=segment.id, settings=settings.segments
        )
    assert refreshed.size == 1
    return segment.id
