"""A real `cdp serve` process: the official Segment and RudderStack SDKs talk to it, and
SIGKILL loses no acknowledged event."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from rudderstack.analytics.client import Client as RudderClient
from segment.analytics import Client

from cdp import migrate
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from ingestion import service
from tests.cdp.test_cli import CDP, _env, free_port, wait_ready

pytestmark = pytest.mark.slow


@dataclass
class Server:
    """A running server and what it needs."""

    url: str
    proc: subprocess.Popen[str]
    data_dir: Path
    write_key: str
    source_id: str
    env: dict[str, str] | None = None


def _prepare(data_dir: Path) -> tuple[str, str]:
    url = f"sqlite:///{data_dir / 'cdp.sqlite3'}"
    migrate.upgrade(url)
    db = Database(url)
    try:
        with db.begin() as session:
            source, key = service.create_source(session, name="web", kind="http")
            assert key is not None
            return source.id, key
    finally:
        db.dispose()


def _start(data_dir: Path, env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen[str]]:
    port = free_port()
    with (data_dir / "server.log").open("a") as log:  # the child keeps its own handle
        proc = subprocess.Popen(
            [*CDP, "serve", "--port", str(port), "--no-scheduler"],
            env={**_env(data_dir), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return url, proc


# Drained once a minute: every acknowledged event is still only in the spool at the kill.
SPOOLED_ONLY = {"CDP_INGESTION__DRAIN_INTERVAL_MS": "60000"}


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """A prepared data dir with an `http` source, and a server over it."""
    source_id, key = _prepare(tmp_path)
    env = getattr(request, "param", None)
    url, proc = _start(tmp_path, env)
    try:
        yield Server(url, proc, tmp_path, key, source_id, env)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _message_ids(data_dir: Path) -> set[str]:
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        return {r[0] for r in warehouse.rows(Query("SELECT message_id FROM events"))}


def test_official_segment_sdk_sends_unchanged(server: Server) -> None:
    errors: list[Exception] = []
    client = Client(
        write_key=server.write_key,
        host=server.url,
        sync_mode=True,
        gzip=True,
        on_error=lambda exc, batch: errors.append(exc),
    )
    client.identify("user-1", {"email": "Ann@Example.com", "phone": None})
    client.track("user-1", "Order Completed", {"total": 30, "loyalty_card": None})
    client.page(anonymous_id="anon-1", name="Home", properties={"path": "/"})
    client.screen("user-1", name="Cart")
    client.group("user-1", "group-1", {"name": "Acme"})
    client.alias("anon-1", "user-1")
    client.flush()
    assert errors == []
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)
    with Warehouse(server.data_dir / "warehouse.duckdb") as warehouse:
        rows = warehouse.rows(Query("SELECT type, event FROM events ORDER BY event_id"))
        identifiers = warehouse.rows(Query("SELECT DISTINCT kind, value FROM event_identifiers"))
    assert [r[0] for r in rows] == ["identify", "track", "page", "screen", "group", "alias"]
    assert rows[1][1] == "Order Completed"
    assert ("email", "ann@example.com") in identifiers
    assert ("anonymous_id", "anon-1") in identifiers


def test_official_rudderstack_sdk_sends_unchanged(server: Server) -> None:
    errors: list[Exception] = []
    client = RudderClient(
        write_key=server.write_key,
        host=server.url,
        sync_mode=True,
        gzip=True,
        on_error=lambda exc, batch: errors.append(exc),
    )
    client.identify(user_id="user-2", traits={"email": "Bo@Example.com", "phone": None})
    client.track(user_id="user-2", event="Order Completed", properties={"total": 12})
    client.page(anonymous_id="anon-2", name="Home", properties={"path": "/"})
    client.screen(user_id="user-2", name="Cart")
    client.group(user_id="user-2", group_id="group-2", traits={"name": "Acme"})
    client.alias(previous_id="anon-2", user_id="user-2")
    client.flush()
    assert errors == []
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=60)
    with Warehouse(server.data_dir / "warehouse.duckdb") as warehouse:
        rows = warehouse.rows(Query("SELECT type, event FROM events ORDER BY event_id"))
        identifiers = warehouse.rows(Query("SELECT DISTINCT kind, value FROM event_identifiers"))
    assert [r[0] for r in rows] == ["identify", "track", "page", "screen", "group", "alias"]
    assert rows[1][1] == "Order Completed"
    assert ("email", "bo@example.com") in identifiers
    assert ("anonymous_id", "anon-2") in identifiers


def _spool_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "warehouse.duckdb.spool").glob("*.spool"))


@pytest.mark.parametrize(
    "server", [None, SPOOLED_ONLY], indirect=True, ids=["draining", "spooled-only"]
)
def test_sigkill_loses_no_acknowledged_event(server: Server) -> None:
    acknowledged: set[str] = set()
    lock = threading.Lock()
    enough = threading.Event()
    auth = (server.write_key, "")

    def send() -> None:
        with httpx.Client(base_url=server.url, auth=auth, timeout=10) as http:
            while True:
                ids = [str(uuid.uuid4()) for _ in range(50)]
                batch = [
                    {"type": "track", "messageId": m, "userId": f"u{i}", "event": "E"}
                    for i, m in enumerate(ids)
                ]
                try:
                    resp = http.post("/v1/batch", json={"batch": batch})
                except httpx.TransportError:
                    return  # the server died mid-request: this batch was never acknowledged
                if resp.status_code == 200:
                    with lock:
                        acknowledged.update(ids)
                        if len(acknowledged) >= 5_000:
                            enough.set()

    workers = [threading.Thread(target=send) for _ in range(4)]
    for worker in workers:
        worker.start()
    assert enough.wait(timeout=120)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=30)
    for worker in workers:
        worker.join(timeout=60)
    with lock:
        acked = set(acknowledged)
    if server.env == SPOOLED_ONLY:
        # Before any restart, DuckDB holds at most the first drain: the rest is spooled only.
        in_duckdb = len(_message_ids(server.data_dir))
        assert in_duckdb < len(acked) / 2
        assert _spool_files(server.data_dir)
    # A restarted server replays DuckDB's write-ahead log and the spool, and keeps serving.
    _url, proc = _start(server.data_dir)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    stored = _message_ids(server.data_dir)
    assert acked <= stored, f"{len(acked - stored)} acknowledged events lost"
    assert _spool_files(server.data_dir) == []
    with Warehouse(server.data_dir / "warehouse.duckdb") as warehouse:
        counts = warehouse.rows(
            Query(
                "SELECT count(*), count(DISTINCT message_id),"
                " (SELECT sum(received) - sum(duplicates) FROM ingest_batch_stats),"
                " (SELECT sum(duplicates) FROM ingest_batch_stats) FROM events"
            )
        )[0]
    # Loaded once each, and the counters agree with the events (no replayed duplicates).
    assert counts == (len(stored), len(stored), len(stored), 0)


def _healthz(sock: socket.socket) -> bytes:
    """One request on an open connection; the response's status line."""
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(4096)
        assert chunk, "the server closed the connection"
        body += chunk
    return head.split(b"\r\n")[0]


def test_an_idle_keep_alive_connection_outlives_the_clients_own_timeout(server: Server) -> None:
    """The server keeps idle connections open longer than clients do (httpx, SDKs: 5 s),
    so a client never sends on a connection the server is closing (a read error)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        assert _healthz(sock) == b"HTTP/1.1 200 OK"
        # Idle for longer than uvicorn's own default (5 s), which closed it here before.
        time.sleep(6)
        assert _healthz(sock) == b"HTTP/1.1 200 OK"
