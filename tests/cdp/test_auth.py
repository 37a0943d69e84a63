"""API keys: hashed storage, roles per route, revocation, on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from cdp.auth import ApiKey, RequireRole, Role, hash_key, key_uses
from cdp.db import Database
from tests.conftest import BACKENDS, make_key

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _guards(route: APIRoute) -> list[RequireRole]:
    found: list[RequireRole] = []
    stack = [route.dependant]
    while stack:
        dependant = stack.pop()
        if isinstance(dependant.call, RequireRole):
            found.append(dependant.call)
        stack.extend(dependant.dependencies)
    return found


def _management_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    routes = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        path = context.path or ""
        if isinstance(route, APIRoute) and path.startswith("/api/"):
            for method in sorted(route.methods or ()):
                routes.append((method, path, route))
    return routes


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)


def test_every_management_route_has_a_role_guard(app: FastAPI) -> None:
    routes = _management_routes(app)
    assert routes, "no management routes found"
    unguarded = [f"{m} {p}" for m, p, r in routes if not _guards(r)]
    assert unguarded == []


def test_every_management_route_rejects_missing_revoked_and_wrong_role_keys(
    app: FastAPI, client: TestClient, db: Database
) -> None:
    revoked = make_key(db, Role.admin, "to revoke")
    with db.begin() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(revoked)))
        assert row is not None
        admin = make_key(db, Role.admin, "admin")
        resp = client.delete(f"/api/keys/{row.id}", headers={"Authorization": f"Bearer {admin}"})
    assert resp.status_code == 200
    keys = {role: make_key(db, role) for role in Role}
    for method, path, route in _management_routes(app):
        url = _concrete(path)
        missing = client.request(method, url)
        assert missing.status_code == 401, (method, path, missing.text)
        assert missing.json()["error"]["code"] == "unauthorized"
        bogus = client.request(method, url, headers={"Authorization": "Bearer cdp_nope_nope"})
        assert bogus.status_code == 401, (method, path)
        gone = client.request(method, url, headers={"Authorization": f"Bearer {revoked}"})
        assert gone.status_code == 401, (method, path, gone.text)
        allowed = set.intersection(*(set(g.roles) for g in _guards(route)))
        for role in set(Role) - allowed:
            wrong = client.request(method, url, headers={"Authorization": f"Bearer {keys[role]}"})
            assert wrong.status_code == 403, (method, path, role, wrong.text)
            assert wrong.json()["error"]["code"] == "forbidden"


def test_created_key_is_shown_once_and_stored_hashed(
    client: TestClient, db: Database, admin_headers: dict[str, str]
) -> None:
    resp = client.post("/api/keys", json={"name": "etl", "role": "data"}, headers=admin_headers)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    clear = body["key"]
    assert clear.startswith("cdp_")
    with db.begin() as session:
        rows = session.scalars(select(ApiKey)).all()
        stored = next(r for r in rows if r.id == body["id"])
        assert stored.key_hash == hash_key(clear)
        assert all(clear not in (r.key_hash, r.prefix, r.name) for r in rows)
    listed = client.get("/api/keys", headers=admin_headers).json()
    assert listed["total"] == 2
    assert all("key" not in item for item in listed["items"])
    assert clear not in str(listed)


def test_key_works_records_last_use_and_stops_after_revocation(
    client: TestClient, db: Database, admin_headers: dict[str, str]
) -> None:
    created = client.post(
        "/api/keys", json={"name": "ops", "role": "admin"}, headers=admin_headers
    ).json()
    assert created["last_used_at"] is None
    headers = {"Authorization": f"Bearer {created['key']}"}
    assert client.get("/api/jobs", headers=headers).status_code == 200
    listed = client.get("/api/keys", headers=admin_headers).json()["items"]
    used = next(k for k in listed if k["id"] == created["id"])
    assert used["last_used_at"] is not None
    revoked = client.delete(f"/api/keys/{created['id']}", headers=admin_headers)
    assert revoked.json()["revoked_at"] is not None
    assert client.get("/api/jobs", headers=headers).status_code == 401


def test_viewer_reads_but_cannot_create_keys_or_run_jobs(client: TestClient, db: Database) -> None:
    viewer = {"Authorization": f"Bearer {make_key(db, Role.viewer)}"}
    assert client.get("/api/jobs", headers=viewer).status_code == 200
    assert client.get("/api/keys", headers=viewer).status_code == 403
    body: dict[str, Any] = {"name": "x", "role": "admin"}
    assert client.post("/api/keys", json=body, headers=viewer).status_code == 403
    assert client.post("/api/jobs/warehouse.checkpoint/run", headers=viewer).status_code == 403


def test_key_creation_validates_role(client: TestClient, admin_headers: dict[str, str]) -> None:
    resp = client.post("/api/keys", json={"name": "x", "role": "god"}, headers=admin_headers)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"
    assert "role" in resp.json()["error"]["message"]


def test_revoking_unknown_key_is_404(client: TestClient, admin_headers: dict[str, str]) -> None:
    resp = client.delete(f"/api/keys/{uuid.uuid4()}", headers=admin_headers)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_a_request_never_waits_for_the_write_lock_to_record_its_keys_use(
    client: TestClient, db: Database, backend: str
) -> None:
    """A key's first use is written in the background: while another writer holds the
    store's write lock (SQLite) or the key's row (PostgreSQL), its requests still answer, and
    the use is stored once the lock is released."""
    clear = make_key(db, Role.viewer)
    headers = {"Authorization": f"Bearer {clear}"}
    admin = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}
    with db.begin() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(clear)))
    holder = db.engine.connect()
    pool = ThreadPoolExecutor(max_workers=4)
    try:
        if backend == "sqlite":
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            holder.begin()
            holder.execute(select(ApiKey.id).where(ApiKey.id == key_id).with_for_update())
        answers = [pool.submit(client.get, "/api/jobs", headers=headers) for _ in range(8)]
        # Well under the store's 30 s lock timeout: the old key check waited for the lock.
        codes = [a.result(timeout=20).status_code for a in answers]
        assert codes == [200] * 8
        listed = client.get("/api/keys", headers=admin).json()["items"]
        mine = next(k for k in listed if k["id"] == key_id)
        assert mine["last_used_at"] is not None  # noted, shown before it is written
    finally:
        holder.rollback()
        holder.close()
        pool.shutdown()
    assert key_uses(db).flush(timeout=30)
    with db.begin() as session:
        assert session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == key_id)) is not None
