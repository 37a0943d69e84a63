"""Building event frames for the engine tests."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
import polars as pl

from loyalty.engine import EVENT_SCHEMA

_counter = iter(range(1, 10**9))


def ev(
    profile: str,
    at: datetime,
    name: str = "Order Completed",
    event_id: int | None = None,
    **properties: Any,  # Any: event properties
) -> dict[str, Any]:  # Any: a row
    """One event row of a profile."""
    number = event_id if event_id is not None else next(_counter)
    return {
        "event_id": number,
        "message_id": f"m{number}",
        "source_id": "web",
        "type": "track",
        "event": name,
        "timestamp": at,
        "properties": orjson.dumps(properties).decode(),
        "profile_id": profile,
    }


def frame(rows: list[dict[str, Any]]) -> pl.DataFrame:  # Any: rows
    """A frame of event rows with the engine's schema."""
    return pl.DataFrame(rows, schema=EVENT_SCHEMA)
