"""The database connector against a real table in the local PostgreSQL server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import create_engine, text

from cdp.config import Settings
from cdp.db import Database
from cdp.scheduler import JobRunner
from cdp.warehouse import Query, Warehouse
from ingestion import jobs, service
from ingestion.errors import PullFailed
from ingestion.schemas import DatabaseConfig, Mapping
from tests.conftest import postgres_schema_url

MAPPING = Mapping.model_validate(
    {
        "event": "Order Updated",
        "timestamp": "updated_at",
        "identifiers": [
            {"kind": "email", "column": "email"},
            {"kind": "loyalty_card", "column": "card"},
        ],
        "properties": ["order_id", "total"],
    }
)


@pytest.fixture
def shop_url() -> Iterator[str]:
    """A PostgreSQL schema holding an `orders` table, dropped after the test."""
    schema = f"shop_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_schema_url("public"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        conn.execute(
            text(
                f'CREATE TABLE "{schema}".orders (order_id int primary key, email text,'
                " card text, total numeric(10,2), updated_at timestamptz)"
            )
        )
    try:
        yield postgres_schema_url(schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _insert(url: str, rows: list[tuple[int, str | None, str | None, float, datetime]]) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for order_id, email, card, total, updated in rows:
            conn.execute(
                text(
                    "INSERT INTO orders VALUES (:i, :e, :c, :t, :u) ON CONFLICT (order_id)"
                    " DO UPDATE SET total = :t, updated_at = :u"
                ),
                {"i": order_id, "e": email, "c": card, "t": total, "u": updated},
            )
    engine.dispose()


def _source(db: Database, url: str, **config: object) -> str:
    with db.begin() as session:
        source, _ = service.create_source(
            session,
            name="shop",
            kind="database",
            config={"url": url, "table": "orders", "cursor_column": "updated_at", **config},
            mapping=MAPPING,
        )
        return source.id


T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_pulls_are_incremental_chunked_and_save_the_cursor(
    db: Database, warehouse: Warehouse, shop_url: str
) -> None:
    # Three rows share one cursor value: a chunk of 2 must not split them.
    _insert(
        shop_url,
        [
            (1, "A@x.io", "K1", 10, T0),
            (2, "b@x.io", None, 20, T0 + timedelta(hours=1)),
            (3, None, "K3", 30, T0 + timedelta(hours=1)),
            (4, "d@x.io", "K4", 40, T0 + timedelta(hours=1)),
            (5, None, None, 50, T0 + timedelta(hours=2)),
        ],
    )
    source_id = _source(db, shop_url, chunk_size=2)
    run = service.pull_database(db, warehouse, source_id=source_id, region="FR")
    assert (run.status, run.rows_read, run.accepted, run.rejected) == ("succeeded", 5, 4, 1)
    with db.begin() as session:
        source = service.get_source(session, source_id=source_id)
        assert source.cursor_value is not None
        assert datetime.fromisoformat(source.cursor_value) == T0 + timedelta(hours=2)
    nothing = service.pull_database(db, warehouse, source_id=source_id, region="FR")
    assert nothing.rows_read == 0
    _insert(
        shop_url,
        [
            (2, "b@x.io", None, 25, T0 + timedelta(hours=3)),
            (6, "f@x.io", None, 60, T0 + timedelta(hours=3)),
        ],
    )
    update = service.pull_database(db, warehouse, source_id=source_id, region="FR")
    assert (update.rows_read, update.accepted) == (2, 2)
    totals = warehouse.rows(
        Query(
            "SELECT properties->>'$.order_id', properties->>'$.total' FROM events"
            " WHERE event_id > 4 ORDER BY event_id"
        )
    )
    assert totals == [("2", "25.00"), ("6", "60.00")]
    assert (
        warehouse.scalar(
            Query(
                "SELECT value FROM event_identifiers WHERE kind = 'email' ORDER BY event_id LIMIT 1"
            )
        )
        == "a@x.io"
    )


def test_cursor_is_not_saved_when_the_load_fails(
    db: Database, warehouse: Warehouse, shop_url: str
) -> None:
    _insert(shop_url, [(1, "a@x.io", None, 10, T0)])
    source_id = _source(db, shop_url)
    warehouse.close()  # the load cannot commit
    with pytest.raises(RuntimeError):
        service.pull_database(db, warehouse, source_id=source_id, region="FR")
    with db.begin() as session:
        assert service.get_source(session, source_id=source_id).cursor_value is None
        runs, _ = service.list_imports(session, source_id=source_id, limit=5, offset=0)
        assert runs[0].status == "failed"


def test_a_missing_cursor_column_fails_clearly(
    db: Database, warehouse: Warehouse, shop_url: str
) -> None:
    with db.begin() as session:
        source, _ = service.create_source(
            session,
            name="bad",
            kind="database",
            config={"url": shop_url, "table": "orders", "cursor_column": "nope"},
            mapping=MAPPING,
        )
    with pytest.raises(PullFailed, match="nope"):
        service.pull_database(db, warehouse, source_id=source.id, region="FR")


def test_query_sources_and_the_schedule_job(
    settings: Settings, db: Database, warehouse: Warehouse, shop_url: str
) -> None:
    _insert(shop_url, [(1, "a@x.io", "K1", 10, T0), (2, "b@x.io", "K2", 20, T0)])
    with db.begin() as session:
        service.create_source(
            session,
            name="q",
            kind="database",
            config={
                "url": shop_url,
                "query": "SELECT * FROM orders WHERE total > 15",
                "cursor_column": "updated_at",
                "schedule": {"cron": "*/5 * * * *"},
            },
            mapping=MAPPING,
        )
        service.create_source(
            session,
            name="unscheduled",
            kind="database",
            config={"url": shop_url, "table": "orders", "cursor_column": "updated_at"},
            mapping=MAPPING,
        )
    runner = JobRunner(settings, db, warehouse)
    runner.register(*jobs.JOBS)
    run = runner.run("ingestion.pull_databases", trigger="manual")
    runner.shutdown()
    assert (run.status, run.rows) == ("succeeded", 1)
    assert warehouse.scalar(Query("SELECT count(*) FROM events")) == 1
    config = DatabaseConfig.model_validate(
        {"url": shop_url, "table": "t", "cursor_column": "c", "schedule": {"cron": "0 * * * *"}}
    )
    last = datetime(2026, 11, 1, 10, 30, tzinfo=UTC)
    assert not jobs.is_due(config, last, datetime(2026, 11, 1, 10, 59, tzinfo=UTC))
    assert jobs.is_due(config, last, datetime(2026, 11, 1, 11, 0, tzinfo=UTC))
