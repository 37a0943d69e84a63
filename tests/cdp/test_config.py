"""Settings: defaults derived from the data dir, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.config import Settings


def test_defaults_put_both_stores_in_the_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDP_DATA_DIR", "CDP_DATABASE_URL", "CDP_WAREHOUSE_PATH"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.data_dir == Path("./data")
    assert settings.db_url == "sqlite:///data/cdp.sqlite3"
    assert settings.warehouse_file == Path("data/warehouse.duckdb")
    assert settings.scheduler.enabled is True


def test_environment_overrides_every_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CDP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CDP_DATABASE_URL", "postgresql://db/cdp")
    monkeypatch.setenv("CDP_DUCKDB_MEMORY_LIMIT", "2GB")
    monkeypatch.setenv("CDP_DEFAULT_PHONE_REGION", "GB")
    monkeypatch.setenv("CDP_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CDP_SCHEDULER__ENABLED", "false")
    settings = Settings()
    assert settings.db_url == "postgresql://db/cdp"
    assert settings.warehouse_file == tmp_path / "warehouse.duckdb"
    assert settings.duckdb_memory_limit == "2GB"
    assert settings.default_phone_region == "GB"
    assert settings.log_level == "DEBUG"
    assert settings.scheduler.enabled is False


def test_invalid_log_level_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="log_level"):
        Settings()
