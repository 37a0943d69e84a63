"""The identity benchmark runs at a tiny scale and its quality figures are sound."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from benchmarks import identity as bench


def test_identity_benchmark_runs_tiny(tmp_path: Path) -> None:
    result = bench.run(300, tmp_path)
    names = [m.name for m in result.measures]
    assert names[:2] == [
        "full resolution",
        "labelling step inside the full resolution (scipy + rule-aware pass)",
    ]
    assert result.measures[0].reference is not None
    assert result.details["incremental"]["events"] == bench.INCREMENTAL_EVENTS
    quality = result.details["quality"]
    assert quality["precision"] >= 0.98
    assert quality["recall"] >= 0.9


def test_pairwise_scores_count_over_and_under_merges() -> None:
    truth = pl.DataFrame({"person": [1, 1, 2, 2, 3], "profile_id": ["a", "a", "b", "b", "c"]})
    perfect = bench.scores(truth)
    assert (perfect["precision"], perfect["recall"]) == (1.0, 1.0)
    merged = bench.scores(truth.with_columns(pl.col("profile_id").replace({"c": "b"})))
    assert merged["precision"] == 0.5  # 4 pairs predicted (1 in a, 3 in b), 2 true
    assert merged["over_merged_persons"] == 2
    split = bench.scores(truth.with_columns(pl.Series("profile_id", ["a", "x", "b", "b", "c"])))
    assert split["recall"] == 0.5
    assert split["under_merged_persons"] == 1


def test_synthetic_data_is_consistent() -> None:
    data = bench.generate(50, seed=1)
    assert data.identifiers["event_id"].is_in(data.events["event_id"]).all()
    assert data.events["event_id"].is_unique().all()
    assert data.truth.height == data.events.height


def test_identity_quality_benchmark_scores_a_generated_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import identity_quality

    monkeypatch.delenv("CDP_SAMPLE_DIR", raising=False)
    result = identity_quality.run(150, tmp_path)
    quality = result.details["quality"]
    # Every ground-truth record is scored, once.
    truth = pl.read_parquet(tmp_path / "sample" / "ground_truth" / "record_person.parquet")
    assert quality["records"] == truth.height
    assert 0.0 < quality["recall"] <= quality["recall_bound"] <= 1.0
    assert quality["ingested_recall"] <= quality["ingested_recall_bound"]
    assert quality["precision"] >= 0.95
    assert result.measures[1].reference == quality["recall_bound"]
