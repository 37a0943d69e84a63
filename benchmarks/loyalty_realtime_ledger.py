"""Loyalty real time on a large programme: `loyalty_realtime` against an existing ledger.

`loyalty_realtime` starts from an empty programme, so the statements its job runs for each
batch (enrolment, caps, tier priors and progress, lots, activity) only ever meet small
tables. Here the operational store first receives the `loyalty_jobs` programme of `scale`
members (about 8.5 ledger entries and one lot each over two years, Silver/Gold/Platinum
tiers on qualifying points over 12 months, merged and unenrolled memberships), made
automatic-enrolment and given the 1-point-per-euro rule. Then the same steady load at
1,000 events/s (60 s from 600,000 members) and the same probes run through a real
`cdp serve`. The people of the load and of the probes are new: they enrol into the large
programme and their statements run against its tables. The reference is the same as
`loyalty_realtime`'s: ack → profile visible through identity's lookup, on the same probes.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import loyalty_jobs, loyalty_realtime
from benchmarks.core import Result, timer
from cdp import migrate
from cdp.db import Database
from migrations.models import load_all_models

LONGEST = 60.0  # seconds of load: 60 from 600,000 members, 5 at least


def load_seconds(scale: int) -> float:
    """How long the steady load runs on a programme of `scale` members."""
    return max(5.0, min(LONGEST, scale / 10_000))


def run(scale: int, workdir: Path) -> Result:
    """Build a programme of `scale` members, then measure real time on it."""
    load_all_models()
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("cdp.sqlite3", "cdp.sqlite3-wal", "cdp.sqlite3-shm", "warehouse.duckdb"):
        (workdir / name).unlink(missing_ok=True)
    url = loyalty_realtime.store_url(workdir)
    migrate.upgrade(url)
    db = Database(url)
    try:
        with timer() as build_time:
            built = loyalty_jobs.build(db, None, scale, enrolment="automatic")
    finally:
        db.dispose()
    program_id = str(built.pop("program_id"))
    key, admin, _ = loyalty_realtime.setup(workdir, program_id)
    result = loyalty_realtime.measure(
        workdir,
        seconds=load_seconds(scale),
        key=key,
        admin=admin,
        program_id=program_id,
        name="loyalty_realtime_ledger",
    )
    result.scale = scale
    result.details.update({f"existing {name}": value for name, value in built.items()})
    result.details["build s"] = round(build_time(), 1)
    return result
