"""Every registered benchmark runs at a tiny scale, so none of them rots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import BENCHMARKS, main

TINY_SCALE = 300


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_runs_tiny_and_reports_a_ratio(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "result.json"
    workdir = tmp_path / "work"
    workdir.mkdir()
    code = main([name, "--scale", str(TINY_SCALE), "--json", str(out), "--workdir", str(workdir)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert result["measures"], "a benchmark must report at least one measure"
    assert any(m["reference"] is not None and m["ratio"] is not None for m in result["measures"])
    assert name in capsys.readouterr().out


def test_sample_warehouse_loads_a_sample_once_and_copies(tmp_path: Path) -> None:
    from benchmarks.sample_warehouse import ensure
    from cdp.sample_data import generate
    from cdp.warehouse import Query, Warehouse

    sample = tmp_path / "sample"
    generate(customers=TINY_SCALE, seed=3, out=sample)
    prepared = ensure(sample, tmp_path / "stores", memory_limit="1GB")
    assert prepared.events > 0
    assert 0 < prepared.profiles < prepared.events
    stamp = prepared.warehouse_file.stat().st_mtime_ns
    again = ensure(sample, tmp_path / "stores")
    assert again.warehouse_file.stat().st_mtime_ns == stamp, "a ready folder is reused"
    assert again.profiles == prepared.profiles
    copy = again.copy_to(tmp_path / "copy")
    with Warehouse(copy.warehouse_file, holder="test").open() as warehouse:
        assert warehouse.scalar(Query("SELECT count(*) FROM events")) == prepared.events


def test_the_loyalty_backfill_benchmark_measures_the_same_work_in_a_reused_workdir(
    tmp_path: Path,
) -> None:
    """The backfill writes into its stores: a second run in the same folder must start from
    a fresh copy (and its storage floor from an empty file), not from the first run's."""
    details = []
    workdir = str(tmp_path / "work")
    for run in range(2):
        out = tmp_path / f"result{run}.json"
        args = ["--scale", str(TINY_SCALE), "--json", str(out), "--workdir", workdir]
        code = main(["loyalty_sample", *args])
        assert code == 0
        details.append(json.loads(out.read_text())["details"])
    assert details[0]["ledgers identical (entry by entry)"] is True
    assert details[1] == details[0] | {
        k: details[1][k] for k in details[1] if k.endswith(("MiB", " s", "events/s"))
    }


def test_the_loyalty_jobs_benchmark_runs_every_daily_job_on_real_work(tmp_path: Path) -> None:
    """Each job must have something to do at a tiny scale, or the figures time nothing."""
    out = tmp_path / "result.json"
    code = main(["loyalty_jobs", "--scale", "2000", "--json", str(out), "--workdir", str(tmp_path)])
    assert code == 0
    details = json.loads(out.read_text())["details"]
    assert details["members"] == 2000
    assert details["snapshot rows"] == 2000 - 20  # 1% merged away
    for key in ("lots expired", "tier upgrades", "tier downgrades", "birthday credits"):
        assert details[key] > 0, key
    assert details["members marked below their tier"] > 0
