"""Clients that give up mid-request never leave the server without database connections.

FastAPI runs a sync dependency and the endpoint in two worker threads. The key check used
to hold the request's pooled connection from the first to the second, so under a burst every
worker thread could be waiting for a connection while every connection waited for a thread:
after 200 clients timed out, 15 connections stayed checked out and the server answered
nothing more (found under the real-time benchmark's probes).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from cdp.app import create_app
from cdp.auth import Role
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from tests.conftest import BACKENDS, make_key

BURST = 200
DRAIN_DEADLINE_S = 90.0  # longer than the pool's 30 s wait, so only a wedge can exceed it


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(settings: Settings, db: Database, warehouse: Warehouse) -> Iterator[str]:
    """The real app behind a real uvicorn server, in this process (its pool is inspectable)."""
    app = create_app(settings, db=db, warehouse=warehouse, start_scheduler=False)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "the server stopped while starting"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=60)


async def _give_up(url: str, headers: dict[str, str]) -> list[str]:
    """`BURST` concurrent requests whose clients stop waiting after 3 ms."""
    timeout = httpx.Timeout(10.0, read=0.003)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:

        async def one() -> str:
            try:
                answer = await client.get("/api/keys", headers=headers)
            except httpx.TimeoutException:
                return "gave up"
            return str(answer.status_code)

        return await asyncio.gather(*[one() for _ in range(BURST)])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_clients_giving_up_mid_request_leave_every_connection_returned(
    served: str, db: Database
) -> None:
    headers = {"Authorization": f"Bearer {make_key(db, Role.admin)}"}
    outcomes = asyncio.run(_give_up(served, headers))
    assert "gave up" in outcomes, "the burst must have clients giving up mid-request"
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while db.engine.pool.checkedout() and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.1)
    assert db.engine.pool.checkedout() == 0, db.engine.pool.status()  # type: ignore[attr-defined]
    answer = httpx.get(f"{served}/api/keys", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
