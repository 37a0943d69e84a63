"""The segments benchmarks run at a tiny scale and their results agree with the references."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import segments_attributes, segments_rules, segments_sample


def test_attribute_benchmark_runs_tiny_and_matches_the_hand_written_query(tmp_path: Path) -> None:
    result = segments_attributes.run(300, tmp_path)
    assert result.details["same_values"] is True
    assert result.details["profiles"] == 300
    assert result.measures[0].ratio is not None


def test_rules_benchmark_runs_tiny_and_counts_match_hand_written_sql(tmp_path: Path) -> None:
    result = segments_rules.run(300, tmp_path)
    assert result.details["counts_equal"] is True
    assert len(result.measures) == 11


def test_sample_benchmark_runs_tiny_and_agrees_with_hand_written_sql(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CDP_BENCH_PREPARED", raising=False)
    monkeypatch.setenv("CDP_BENCH_ROUNDS", "1")
    result = segments_sample.run(400, tmp_path)
    assert result.details["attributes_same_values"] is True
    assert result.details["counts_equal"] is True, result.details.get("mismatched")
    assert len(result.measures) == 13
    assert result.details["incremental"]["same_members"] is True
    assert result.details["incremental"]["incremental"]["mode"] == "incremental"
