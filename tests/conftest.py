"""Shared fixtures: settings, both operational backends, a fresh warehouse, the app and keys."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cdp.app import create_app
from cdp.auth import Role, create_key
from cdp.config import Settings
from cdp.db import Base, Database
from cdp.warehouse import Warehouse
from migrations.models import load_all_models

load_all_models()

POSTGRES_URL = os.environ.get(
    "CDP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
BACKENDS = ("sqlite", "postgres")
# One prefix per test run, so concurrent runs on the same server never share a schema.
RUN_ID = uuid.uuid4().hex[:8]


def postgres_schema_url(schema: str) -> str:
    """The test server's URL with `search_path` set to `schema`."""
    url = make_url(POSTGRES_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The operational backend under test: SQLite unless a test parametrizes it."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """An empty operational database of the chosen backend, dropped after the test."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'operational.sqlite3'}"
        return
    schema = f"cdp_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_schema_url("public"))
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield postgres_schema_url(schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """The operational store with every table created from the models."""
    database = Database(db_url)
    Base.metadata.create_all(database.engine)
    yield database
    database.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    """Settings pointing at this test's own files, scheduler off."""
    return Settings(
        data_dir=tmp_path,
        database_url=db_url,
        warehouse_path=tmp_path / "warehouse.duckdb",
        duckdb_memory_limit="1GB",
        duckdb_threads=2,
        log_json=False,
        scheduler={"enabled": False},
    )


@pytest.fixture
def warehouse() -> Iterator[Warehouse]:
    """A fresh in-memory warehouse with the schema applied."""
    wh = Warehouse(":memory:", memory_limit="1GB", threads=2).open()
    yield wh
    wh.close()


@pytest.fixture
def app(settings: Settings, db: Database, warehouse: Warehouse) -> FastAPI:
    """The real app over this test's stores."""
    return create_app(settings, db=db, warehouse=warehouse, start_scheduler=False)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """An HTTP client of the real ASGI app (lifespan included)."""
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def make_key(db: Database, role: Role, name: str | None = None) -> str:
    """Create an API key of `role` and return it in clear."""
    with db.begin() as session:
        _, clear = create_key(session, name=name or f"test {role.value}", role=role)
    return clear


@pytest.fixture
def admin_key(db: Database) -> str:
    """An admin API key."""
    return make_key(db, Role.admin)


@pytest.fixture
def admin_headers(admin_key: str) -> dict[str, str]:
    """Authorization headers of an admin key."""
    return {"Authorization": f"Bearer {admin_key}"}
