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
