"""Fixtures of the ingestion tests: a data key, sources and write-key headers."""

from __future__ import annotations

import base64
from typing import Any

import polars as pl
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cdp.auth import Role
from cdp.db import Database
from ingestion.loader import EVENT_SCHEMA, IDENTIFIER_SCHEMA, LoadInput
from tests.conftest import make_key


def basic(write_key: str) -> dict[str, str]:
    """Headers carrying a write key the way Segment SDKs send it."""
    token = base64.b64encode(f"{write_key}:".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def drained(client: TestClient) -> None:
    """Wait until every event the tracking API acknowledged is loaded into the warehouse.

    The API answers once events are in its fsynced spool; a drainer thread loads them
    into DuckDB shortly after (see docs/ingestion.md).
    """
    app = client.app
    assert isinstance(app, FastAPI)
    assert app.state.ingestion.wait_drained(timeout=30), "spooled events were not loaded"


@pytest.fixture
def data_headers(db: Database) -> dict[str, str]:
    """Authorization headers of a `data` key."""
    return {"Authorization": f"Bearer {make_key(db, Role.data)}"}


def create_source(
    client: TestClient, headers: dict[str, str], **body: Any
) -> dict[str, Any]:  # Any: JSON
    """Create a source through the API and return its JSON."""
    resp = client.post("/api/sources", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


@pytest.fixture
def http_source(client: TestClient, data_headers: dict[str, str]) -> dict[str, Any]:
    """An `http` source with a loyalty card path and a composite key in its mapping."""
    return create_source(
        client,
        data_headers,
        name="web",
        kind="http",
        mapping={
            "identifiers": [
                {"kind": "loyalty_card", "column": "properties.loyalty_card"},
                {"kind": "name_dob", "composite": ["last_name", "birth_date"]},
            ]
        },
    )


def track_load(source_id: str, ids: list[str]) -> LoadInput:
    """A load of `track` events "E" with these message ids, each with a `user_id` identifier
    equal to its message id."""
    n = len(ids)
    events = pl.DataFrame(
        {
            "_row": list(range(n)),
            "message_id": ids,
            "source_id": [source_id] * n,
            "type": ["track"] * n,
            "event": ["E"] * n,
            "timestamp": [pl.datetime(2026, 1, 1)] * n,
        }
    ).with_columns(
        pl.datetime(2026, 1, 1).alias("timestamp"), pl.datetime(2026, 1, 1).alias("received_at")
    )
    events = (
        events.with_columns(
            [
                pl.lit(None, dtype=t).alias(c)
                for c, t in EVENT_SCHEMA.items()
                if c not in events.columns
            ]
        )
        .select(list(EVENT_SCHEMA))
        .cast(EVENT_SCHEMA)  # type: ignore[arg-type]  # polars' cast mapping is invariant
    )
    identifiers = pl.DataFrame(
        {"_row": list(range(n)), "kind": ["user_id"] * n, "value": ids}, schema=IDENTIFIER_SCHEMA
    )
    return LoadInput(channel="file", events=events, identifiers=identifiers)
