"""Platform settings, read from `CDP_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class SchedulerSettings(BaseModel):
    """Background job settings."""

    enabled: bool = True


class IngestionSettings(BaseModel):
    """Tracking API limits and the group-commit writer."""

    max_body_bytes: int = Field(default=500 * 1024, description="Largest tracking request body")
    queue_max_events: int = Field(
        default=200_000,
        description="Messages accepted but not yet loaded into DuckDB before answering 429",
    )
    writer_linger_ms: float = Field(
        default=0.0, description="Pause before each spool write to gather more requests"
    )
    spool_dir: Path | None = Field(
        default=None, description="Tracking spool directory; default beside the warehouse"
    )
    spool_segment_bytes: int = Field(default=64 * 1024 * 1024, description="Spool file size")
    drain_interval_ms: float = Field(
        default=100.0, description="Most frequent load of spooled events into DuckDB"
    )
    drain_max_events: int = Field(default=100_000, description="Most messages in one load")
    key_cache_seconds: float = Field(default=2.0, description="How long a write key is cached")


class PurchaseSettings(BaseModel):
    """What a purchase is, for the built-in computed attributes (Segment e-commerce spec)."""

    event: str = "Order Completed"
    amount_properties: list[str] = Field(
        default=["revenue", "total"],
        description="Properties holding the amount, the first present one wins.",
    )
    refund_event: str = "Order Refunded"
    order_id_property: str = "order_id"


class VisitSettings(BaseModel):
    """What a visit is: a distinct day with one of these event types (or a purchase)."""

    event_types: list[str] = Field(default=["page", "screen"])
    include_purchases: bool = True


class SegmentsSettings(BaseModel):
    """Computed attributes and segments."""

    purchase: PurchaseSettings = PurchaseSettings()
    visit: VisitSettings = VisitSettings()
    default_refresh_minutes: int = Field(
        default=60, ge=1, description="Refresh period of a saved segment that sets none."
    )
    preview_sample_size: int = Field(default=10, ge=0, le=100)


class Settings(BaseSettings):
    """Every setting of the platform; nested models hold each domain's settings."""

    model_config = SettingsConfigDict(
        env_prefix="CDP_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    data_dir: Path = Path("./data")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the operational store; default SQLite file."
    )
    warehouse_path: Path | None = Field(
        default=None, description="DuckDB file of the warehouse; default in the data dir."
    )
    duckdb_memory_limit: str = "4GB"
    duckdb_threads: int | None = None
    default_phone_region: str = "FR"
    log_level: LogLevel = "INFO"
    log_json: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    # Seconds an idle HTTP keep-alive connection stays open. Longer than the clients' and
    # load balancers' own idle timeouts (httpx 5 s, AWS ALB 60 s): with equal timeouts a
    # client could send on a connection the server was closing and see a read error.
    keep_alive_seconds: int = Field(default=65, ge=1)
    scheduler: SchedulerSettings = SchedulerSettings()
    ingestion: IngestionSettings = IngestionSettings()
    segments: SegmentsSettings = SegmentsSettings()

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        # Frozen model: defaults derived from data_dir are set through object.__setattr__.
        if self.database_url is None:
            object.__setattr__(
                self, "database_url", f"sqlite:///{(self.data_dir / 'cdp.sqlite3').as_posix()}"
            )
        if self.warehouse_path is None:
            object.__setattr__(self, "warehouse_path", self.data_dir / "warehouse.duckdb")
        return self

    @property
    def db_url(self) -> str:
        """The operational store URL, always set after validation."""
        assert self.database_url is not None
        return self.database_url

    @property
    def warehouse_file(self) -> Path:
        """The warehouse file path, always set after validation."""
        assert self.warehouse_path is not None
        return self.warehouse_path


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process settings, read once from the environment."""
    return Settings()
