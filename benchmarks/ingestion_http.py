"""Tracking API throughput: `/v1/batch` with batches of 100 events from concurrent
connections on loopback against a real `cdp serve`, acknowledged only once durable.

The reference is a bare Starlette endpoint served by the same Uvicorn, which reads the
body and answers 200 without parsing or storing anything: the HTTP floor of this machine.

The load generator is `wrk` (C, Debian package `wrk`) with a Lua script that builds a
fresh body for every request (unique message ids, so dedupe keeps every event), so the
benchmark measures the server rather than the client. Without `wrk` on PATH a small
raw-socket asyncio client in its own process stands in (slower: it shares the 2 cores).
Throughput counts only `200` answers; after the run the warehouse is opened and its event
count must cover every acknowledged event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from benchmarks.core import Measure, Result
from cdp import migrate
from cdp.db import Database
from cdp.warehouse import Query, Warehouse
from ingestion import service

BATCH = 100
CONNECTIONS = 8
WRK_THREADS = 2
NOW = "2026-11-25T10:00:00Z"

# One Lua state per wrk thread: each builds its bodies from a per-thread counter and stops
# once its share of 200 answers is in, saying so on stdout; wrk itself only ends at `-d` or
# on SIGINT, which the harness sends when every thread is done. `done` prints one JSON line.
LUA = r"""
local threads = {}
local BATCH = %(batch)d

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  quota = tonumber(args[1])
  ok, other, n = 0, 0, 0
  prefix = "t" .. tid .. "-" .. tostring(os.time()) .. "-"
  headers = { ["Content-Type"] = "application/json", ["Authorization"] = args[2] }
end

function request()
  local parts = {}
  for i = 1, BATCH do
    n = n + 1
    parts[i] = '{"type":"track","messageId":"' .. prefix .. n ..
      '","userId":"user-' .. (n %% 5000) ..
      '","event":"Product Viewed","timestamp":"%(now)s","properties":{"sku":"sku-' ..
      (n %% 300) .. '","price":19.9},"context":{"library":{"name":"bench"},' ..
      '"traits":{"email":"u' .. prefix .. n .. '@x.io"}}}'
  end
  local body = '{"sentAt":"%(now)s","batch":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/v1/batch", headers, body)
end

function response(status, headers, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
  if ok == quota then
    io.write("THREAD-DONE\n")
    io.flush()
  end
  if ok >= quota then wrk.thread:stop() end
end

function done(summary, latency, requests)
  local ok_total, other_total = 0, 0
  for _, t in ipairs(threads) do
    ok_total = ok_total + t:get("ok")
    other_total = other_total + t:get("other")
  end
  io.write(string.format(
    '\nRESULT {"ok":%%d,"other":%%d,"seconds":%%f,"p50_us":%%d,"p99_us":%%d}\n',
    ok_total, other_total, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99)))
end
"""


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


def _basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def _wrk(wrk: str, url: str, key: str, requests: int, workdir: Path) -> dict[str, float]:
    """Run wrk until `requests` answers were 200; its JSON summary."""
    script = workdir / "batch.lua"
    script.write_text(LUA % {"batch": BATCH, "now": NOW})
    quota = math.ceil(requests / WRK_THREADS)
    with subprocess.Popen(
        [
            wrk,
            f"-t{WRK_THREADS}",
            f"-c{CONNECTIONS}",
            "-d600s",
            "--timeout",
            "60s",
            "-s",
            str(script),
            url,
            "--",
            str(quota),
            _basic(key),
        ],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        finished = 0
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("THREAD-DONE"):
                finished += 1
                if finished == WRK_THREADS:
                    proc.send_signal(signal.SIGINT)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"wrk failed: {''.join(lines)}")
    line = next(ln for ln in lines if ln.startswith("RESULT "))
    summary: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return summary


def _body(prefix: str, start: int) -> bytes:
    return orjson.dumps(
        {
            "sentAt": NOW,
            "batch": [
                {
                    "type": "track",
                    "messageId": f"{prefix}{n}",
                    "userId": f"user-{n % 5000}",
                    "event": "Product Viewed",
                    "timestamp": NOW,
                    "properties": {"sku": f"sku-{n % 300}", "price": 19.9},
                    "context": {
                        "library": {"name": "bench"},
                        "traits": {"email": f"u{prefix}{n}@x.io"},
                    },
                }
                for n in range(start, start + BATCH)
            ],
        }
    )


async def _raw_load(port: int, key: str, requests: int) -> dict[str, float]:
    """Keep-alive HTTP/1.1 over raw sockets: the fallback when wrk is missing."""
    prefix = f"py-{time.time_ns()}-"
    bodies = [_body(prefix, i * BATCH) for i in range(requests)]
    auth = _basic(key)
    pending = list(reversed(bodies))
    latencies: list[float] = []
    counts = {"ok": 0, "other": 0}

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while pending:
                body = pending.pop()
                head = (
                    "POST /v1/batch HTTP/1.1\r\nHost: bench\r\n"
                    f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                started = time.perf_counter()
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                if status_line.split()[1] == b"200":
                    counts["ok"] += 1
                else:
                    counts["other"] += 1
                    pending.append(body)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    seconds = time.perf_counter() - started
    lat = np.array(latencies) * 1_000_000
    return {
        "ok": counts["ok"],
        "other": counts["other"],
        "seconds": seconds,
        "p50_us": float(np.percentile(lat, 50)),
        "p99_us": float(np.percentile(lat, 99)),
    }


def load(url: str, key: str, requests: int, workdir: Path) -> dict[str, float]:
    """Send `requests` batches (200 answers) to `url` with the best load generator here."""
    wrk = shutil.which("wrk")
    if wrk is not None:
        return _wrk(wrk, url, key, requests, workdir)
    port = int(url.rsplit(":", 1)[1])
    return asyncio.run(_raw_load(port, key, requests))


def _stored_events(workdir: Path) -> int:
    with Warehouse(workdir / "warehouse.duckdb", holder="benchmark") as warehouse:
        return int(warehouse.scalar(Query("SELECT count(*) FROM events")))


def run(scale: int, workdir: Path) -> Result:
    """Send about `scale` events in batches of 100 over several connections to both servers."""
    workdir.mkdir(parents=True, exist_ok=True)
    requests = max(scale // BATCH, CONNECTIONS)
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
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            bare = load(base, key, requests, Path(tmp))
    finally:
        _stop(proc)

    cdp, proc = _serve(
        [sys.executable, "-m", "cdp.cli", "serve", "--no-scheduler"],
        env,
        workdir / "server.log",
        "/healthz",
    )
    try:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            project = load(cdp, key, requests, Path(tmp))
    finally:
        _stop(proc)
    stored = _stored_events(workdir)
    acknowledged = int(project["ok"]) * BATCH
    if stored < acknowledged:
        raise RuntimeError(f"{acknowledged} events acknowledged but only {stored} stored")

    result = Result("ingestion_http", acknowledged)
    result.add(
        Measure(
            "durable events per second",
            "events/s",
            acknowledged / project["seconds"],
            reference=bare["ok"] * BATCH / bare["seconds"],
            reference_name="bare Starlette endpoint, no parsing or storage",
            higher_is_better=True,
        )
    )
    result.add(Measure("p50 latency per request", "ms", project["p50_us"] / 1000))
    result.add(Measure("p99 latency per request", "ms", project["p99_us"] / 1000))
    result.details["load generator"] = "wrk" if shutil.which("wrk") else "python raw sockets"
    result.details["connections"] = CONNECTIONS
    result.details["events per request"] = BATCH
    result.details["answers other than 200 (429)"] = int(project["other"])
    result.details["events stored"] = stored
    result.details["bare endpoint p50 ms"] = round(bare["p50_us"] / 1000, 2)
    return result
