"""Tracking API throughput: `/v1/batch` with batches of 100 events from concurrent
connections on loopback against a real `cdp serve`, acknowledged only once durable.

The reference is a bare Starlette endpoint served by the same Uvicorn, which reads the
body and answers 200 without parsing or storing anything: the HTTP floor of this machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.core import Measure, Result
from cdp import migrate
from cdp.db import Database
from ingestion import service

BATCH = 100
CONNECTIONS = 8


async def _bare(request: Request) -> Response:
    await request.body()
    return Response(b'{"success":true}', media_type="application/json")


bare_app = Starlette(routes=[Route("/v1/batch", _bare, methods=["POST"])])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], path: str) -> None:
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url + path, timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def _bodies(n_batches: int) -> list[bytes]:
    import orjson

    now = "2026-11-25T10:00:00Z"
    return [
        orjson.dumps(
            {
                "sentAt": now,
                "batch": [
                    {
                        "type": "track",
                        "messageId": str(uuid.uuid4()),
                        "userId": f"user-{i % 5000}",
                        "event": "Product Viewed",
                        "timestamp": now,
                        "properties": {"sku": f"sku-{i % 300}", "price": 19.9},
                        "context": {
                            "library": {"name": "bench"},
                            "traits": {"email": f"u{i}@x.io"},
                        },
                    }
                    for i in range(b * BATCH, (b + 1) * BATCH)
                ],
            }
        )
        for b in range(n_batches)
    ]


async def _load(url: str, auth: tuple[str, str], bodies: list[bytes]) -> tuple[float, list[float]]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    headers = {"Content-Type": "application/json"}

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            while True:
                start = time.perf_counter()
                resp = await client.post("/v1/batch", content=body, headers=headers)
                if resp.status_code == 429:
                    await asyncio.sleep(0.05)
                    continue
                resp.raise_for_status()
                latencies.append(time.perf_counter() - start)
                break

    limits = httpx.Limits(max_connections=CONNECTIONS)
    async with httpx.AsyncClient(base_url=url, auth=auth, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies


def _serve(
    cmd: list[str], env: dict[str, str], log: Path, probe: str
) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, probe)
    return url, proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def run(scale: int, workdir: Path) -> Result:
    """Send `scale` events in batches of 100 over several connections to both servers."""
    workdir.mkdir(parents=True, exist_ok=True)
    n_batches = max(scale // BATCH, CONNECTIONS)
    bodies = _bodies(n_batches)
    events = n_batches * BATCH
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update({"CDP_DATA_DIR": str(workdir), "CDP_LOG_LEVEL": "WARNING"})

    url = f"sqlite:///{workdir / 'cdp.sqlite3'}"
    migrate.upgrade(url)
    db = Database(url)
    with db.begin() as session:
        _, key = service.create_source(session, name="bench", kind="http")
    db.dispose()
    assert key is not None

    base, proc = _serve(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.ingestion_http:bare_app",
            "--log-level",
            "warning",
        ],
        env,
        workdir / "bare.log",
        "/",
    )
    try:
        bare_s, _ = asyncio.run(_load(base, (key, ""), bodies))
    finally:
        _stop(proc)

    cdp, proc = _serve(
        [sys.executable, "-m", "cdp.cli", "serve", "--no-scheduler"],
        env,
        workdir / "server.log",
        "/healthz",
    )
    try:
        project_s, latencies = asyncio.run(_load(cdp, (key, ""), bodies))
    finally:
        _stop(proc)

    result = Result("ingestion_http", events)
    result.add(
        Measure(
            "durable events per second",
            "events/s",
            events / project_s,
            reference=events / bare_s,
            reference_name="bare Starlette endpoint, no parsing or storage",
            higher_is_better=True,
        )
    )
    lat = np.array(latencies) * 1000
    result.add(Measure("p50 latency per request", "ms", float(np.percentile(lat, 50))))
    result.add(Measure("p99 latency per request", "ms", float(np.percentile(lat, 99))))
    result.details["connections"] = CONNECTIONS
    result.details["events per request"] = BATCH
    return result
