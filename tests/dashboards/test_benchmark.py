"""The dashboards benchmark runs at a tiny scale and reports its figure beside the reference."""

from __future__ import annotations

from pathlib import Path

from benchmarks.dashboards import run


def test_benchmark_runs_tiny_and_reports_a_ratio(tmp_path: Path) -> None:
    result = run(2000, tmp_path)
    [measure] = result.measures
    assert measure.project > 0
    assert measure.reference is not None
    assert measure.ratio is not None
    assert result.details["widgets"] == 18
