"""Loyalty real time: event acknowledged by the tracking API → points visible on the balance.

A real `cdp serve` (scheduler on, SQLite operational store, DuckDB warehouse) runs as a
subprocess with an active programme (automatic enrolment, 1 point per euro). A load
generator in its own process sends a steady stream of `Order Completed` events of
`customers` people at `rate` events per second (batches of 100 every 100 ms on
`/v1/batch`). Meanwhile the harness sends probes: every 0.5 s an order of a new person
(`/v1/track`, 10 EUR), then polls the member lookup by user id and the member's balance
every 50 ms until the 10 points are spendable. Latency = points visible - probe
acknowledged.

The reference, measured on the same probes: event acknowledged → the person's profile
visible through identity's lookup (`/api/profiles/lookup`), the stage loyalty builds on.
The load generator reports how far it fell behind its schedule, so a run that could not
hold the rate says so; a probe whose points are not visible within 30 s counts as 30 s and
the result says how many did so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
from sqlalchemy import select

from benchmarks.core import Measure, Result
from benchmarks.ingestion_http import _basic, _serve, _stop
from cdp import migrate
from cdp.auth import Role, create_key
from cdp.db import Database
from cdp.scheduler import JobRun
from ingestion import service as ingestion_service
from loyalty import service as loyalty_service
from loyalty.schemas import ProgramCreate, RuleCreate

RATE = 1_000  # events per second of steady load
BATCH = 100
CUSTOMERS = 5_000
PROBE_EVERY = 0.5  # seconds between probes
POLL_EVERY = 0.05  # seconds between two polls of one probe
PROBE_TIMEOUT = 30.0
PROBE_POINTS = 10


async def _steady_load(url: str, key: str, rate: int, seconds: float) -> dict[str, float]:
    """Send `rate` events per second for `seconds` in batches of 100; a JSON summary."""
    auth = _basic(key)
    per_tick = max(1, rate // (BATCH * 10))  # 1,000 events/s: one batch every 100 ms
    interval = per_tick * BATCH / rate
    prefix = f"load-{time.time_ns()}-"
    sent = ok = other = transport_errors = 0
    worst_lag = 0.0
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.perf_counter()
        tick = 0
        pending: set[asyncio.Task[None]] = set()

        async def post(body: bytes) -> None:
            # As an SDK does: a batch that met a network error is sent again (its message
            # ids make the retry harmless); the errors are counted, never dropped silently.
            nonlocal ok, other, transport_errors
            began = time.perf_counter()
            for attempt in range(3):
                try:
                    answer = await client.post(
                        "/v1/batch",
                        content=body,
                        headers={"Authorization": auth, "Content-Type": "application/json"},
                    )
                    break
                except httpx.TransportError:
                    transport_errors += 1
                    if attempt == 2:
                        other += BATCH
                        return
            latencies.append(time.perf_counter() - began)
            if answer.status_code == 200:
                ok += BATCH
            else:
                other += BATCH

        while (due := started + tick * interval) < started + seconds:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            worst_lag = max(worst_lag, -delay)
            for _ in range(per_tick):
                events = []
                for _ in range(BATCH):
                    n = sent
                    sent += 1
                    events.append(
                        {
                            "type": "track",
                            "messageId": f"{prefix}{n}",
                            "userId": f"c-{n % CUSTOMERS}",
                            "event": "Order Completed",
                            "properties": {"order_id": f"{prefix}o{n}", "total": 20 + n % 50},
                        }
                    )
                task = asyncio.create_task(post(orjson.dumps({"batch": events})))
                pending.add(task)
                task.add_done_callback(pending.discard)
            tick += 1
        await asyncio.gather(*pending)
        seconds_taken = time.perf_counter() - started
    return {
        "sent": sent,
        "acknowledged": ok,
        "refused": other,
        "transport_errors": transport_errors,
        "seconds": seconds_taken,
        "worst_lag_s": worst_lag,
        "p95_request_ms": float(np.percentile(np.array(latencies) * 1000, 95)) if latencies else 0,
    }


async def _probe(
    client: httpx.AsyncClient, *, n: int, key: str, admin: str, program_id: str
) -> tuple[float, float]:
    """One probe: (ack → profile visible, ack → points visible), in seconds."""
    user = f"probe-{time.time_ns()}-{n}"
    body = {
        "type": "track",
        "userId": user,
        "event": "Order Completed",
        "properties": {"order_id": f"{user}-o", "total": PROBE_POINTS},
    }
    answer = await client.post("/v1/track", json=body, headers={"Authorization": _basic(key)})
    answer.raise_for_status()
    acked = time.perf_counter()
    headers = {"Authorization": f"Bearer {admin}"}
    profile_at: float | None = None
    member_id: str | None = None
    while time.perf_counter() - acked < PROBE_TIMEOUT:
        if profile_at is None:
            found = await client.get(
                "/api/profiles/lookup", params={"kind": "user_id", "value": user}, headers=headers
            )
            if found.status_code == 200:
                profile_at = time.perf_counter()
        if member_id is None:
            member = await client.get(
                f"/api/loyalty/programs/{program_id}/members/lookup",
                params={"kind": "user_id", "value": user},
                headers=headers,
            )
            if member.status_code == 200:
                member_id = member.json()["id"]
        if member_id is not None:
            balance = await client.get(f"/api/loyalty/members/{member_id}/balance", headers=headers)
            if balance.status_code == 200 and balance.json()["active"] >= PROBE_POINTS:
                seen = time.perf_counter()
                return (profile_at or seen) - acked, seen - acked
        await asyncio.sleep(POLL_EVERY)
    # Not visible in time: counted at the timeout (so a percentile that reaches such probes
    # is a lower bound, and the result says how many there were).
    return (profile_at - acked if profile_at is not None else PROBE_TIMEOUT), PROBE_TIMEOUT


async def _probes(
    url: str, *, key: str, admin: str, program_id: str, seconds: float
) -> list[tuple[float, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        tasks = []
        started = time.perf_counter()
        n = 0
        while time.perf_counter() - started < seconds:
            tasks.append(
                asyncio.create_task(
                    _probe(client, n=n, key=key, admin=admin, program_id=program_id)
                )
            )
            n += 1
            await asyncio.sleep(PROBE_EVERY)
        return list(await asyncio.gather(*tasks))


def store_url(workdir: Path) -> str:
    """The operational store the served platform uses in `workdir`."""
    return f"sqlite:///{workdir / 'cdp.sqlite3'}"


def setup(workdir: Path, program_id: str | None = None) -> tuple[str, str, str]:
    """An http source, an admin key and the programme (a new one unless `program_id`, an
    existing programme, is given) earning 1 point per euro, in the migrated store."""
    url = store_url(workdir)
    migrate.upgrade(url)
    db = Database(url)
    with db.begin() as session:
        _, key = ingestion_service.create_source(session, name="bench", kind="http")
        _, admin = create_key(session, name="bench", role=Role.admin)
        if program_id is None:
            program_id = loyalty_service.create_program(
                session,
                data=ProgramCreate(
                    name="Real time",
                    status="active",
                    enrolment="automatic",
                    timezone="Europe/Paris",
                ),
            ).id
        loyalty_service.create_rule(
            session,
            program_id=program_id,
            data=RuleCreate(
                name="1 pt per euro",
                event_name="Order Completed",
                formula={"type": "per_amount", "rate": 1},
            ),
        )
    db.dispose()
    assert key is not None
    return key, admin, program_id


def _load_process(
    url: str, key: str, rate: int, seconds: float, out: Path
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.loyalty_realtime",
            "--load",
            url,
            key,
            str(rate),
            str(seconds),
            str(out),
        ]
    )


def run(scale: int, workdir: Path) -> Result:
    """Steady load of `RATE` events/s for `scale / RATE` seconds (at least 5), with probes."""
    workdir.mkdir(parents=True, exist_ok=True)
    key, admin, program_id = setup(workdir)
    return measure(
        workdir, seconds=max(5.0, scale / RATE), key=key, admin=admin, program_id=program_id
    )


def measure(
    workdir: Path,
    *,
    seconds: float,
    key: str,
    admin: str,
    program_id: str,
    name: str = "loyalty_realtime",
) -> Result:
    """Serve the platform on `workdir`'s stores and measure under `seconds` of steady load."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    # CDP_BENCH_SERVER_LOG_LEVEL=DEBUG logs each run's steps in the workdir's server.log.
    level = os.environ.get("CDP_BENCH_SERVER_LOG_LEVEL", "WARNING")
    env.update({"CDP_DATA_DIR": str(workdir), "CDP_LOG_LEVEL": level})
    url, server = _serve(
        [sys.executable, "-m", "cdp.cli", "serve"], env, workdir / "server.log", "/healthz"
    )
    summary_file = workdir / "load.json"
    try:
        # A first wave warms the server up (imports, caches, first resolution).
        asyncio.run(_probes(url, key=key, admin=admin, program_id=program_id, seconds=1.0))
        load = _load_process(url, key, RATE, seconds, summary_file)
        try:
            probes = asyncio.run(
                _probes(url, key=key, admin=admin, program_id=program_id, seconds=seconds)
            )
        finally:
            load.wait(timeout=seconds + 120)
    finally:
        _stop(server)
    if load.returncode != 0:
        raise RuntimeError(f"load generator failed with {load.returncode}")
    summary = json.loads(summary_file.read_text())
    profile = np.array([p for p, _ in probes]) * 1000
    points = np.array([v for _, v in probes]) * 1000
    result = Result(name, int(summary["acknowledged"]))
    result.add(
        Measure(
            "p95 ack → points visible",
            "ms",
            float(np.percentile(points, 95)),
            reference=float(np.percentile(profile, 95)),
            reference_name="p95 ack → profile visible (identity lookup)",
        )
    )
    result.add(Measure("p50 ack → points visible", "ms", float(np.percentile(points, 50))))
    result.add(Measure("max ack → points visible", "ms", float(points.max())))
    result.details["probes"] = len(probes)
    late = int((points >= PROBE_TIMEOUT * 1000).sum())
    if late:
        result.details["probes whose points were not visible within the timeout"] = (
            f"{late} of {len(probes)}, counted at {PROBE_TIMEOUT:.0f} s: the percentiles that"
            " reach them are lower bounds"
        )
    result.details["target"] = "p95 under 2,000 ms at 1,000 events/s"
    result.details["steady load"] = (
        f"{summary['acknowledged']:,} events acknowledged in {summary['seconds']:.1f} s"
        f" ({summary['acknowledged'] / summary['seconds']:,.0f}/s), {summary['refused']} refused,"
        f" {summary['transport_errors']} network errors (batch sent again),"
        f" worst lag behind schedule {summary['worst_lag_s'] * 1000:.0f} ms,"
        f" p95 request {summary['p95_request_ms']:.0f} ms"
    )
    result.details["real-time job runs"] = _job_runs(workdir)
    return result


def _job_runs(workdir: Path) -> str:
    """How long the real-time job's runs took, first and last third of the run apart.

    Read from the server's own run records (`cdp_job_run`). A run takes the events loaded
    while it worked in further passes, for up to `loyalty.jobs.MAX_RUN_SECONDS`: under a
    steady load that keeps up, runs last that long (or until the load stops), and the
    latency figures, not the run lengths, say whether the job kept up.
    """
    db = Database(store_url(workdir))
    try:
        with db.begin() as session:
            runs = session.execute(
                select(JobRun.started_at, JobRun.finished_at, JobRun.rows)
                .where(JobRun.job == "loyalty.process_events", JobRun.finished_at.is_not(None))
                .order_by(JobRun.started_at)
            ).all()
    finally:
        db.dispose()
    seconds = np.array([(r.finished_at - r.started_at).total_seconds() for r in runs])
    if not len(seconds):
        return "none recorded"
    third = max(1, len(seconds) // 3)
    first, last = seconds[:third], seconds[-third:]
    return (
        f"{len(seconds)} runs, {sum(r.rows or 0 for r in runs):,} events; seconds per run"
        f" mean / p95 / max {seconds.mean():.3f} / {np.percentile(seconds, 95):.3f} /"
        f" {seconds.max():.3f}; first third mean {first.mean():.3f}, last third"
        f" {last.mean():.3f}"
    )


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="steady tracking load (benchmark helper)")
    parser.add_argument("--load", nargs=5, metavar=("URL", "KEY", "RATE", "SECONDS", "OUT"))
    args = parser.parse_args(argv)
    url, key, rate, seconds, out = args.load
    summary = asyncio.run(_steady_load(url, key, int(rate), float(seconds)))
    Path(out).write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
