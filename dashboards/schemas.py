"""API models of the dashboards package."""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dashboards.metrics import Aggregation, Breakdown, Grain, Store

ChartType = Literal["number", "line", "bar", "table"]
RangePreset = Literal["7d", "30d", "90d", "365d"]
PRESET_DAYS: dict[str, int] = {"7d": 7, "30d": 30, "90d": 90, "365d": 365}
MAX_RANGE_DAYS = 3660


class MetricRead(BaseModel):
    """A metric of the catalogue."""

    name: str
    title: str
    unit: str
    store: Store
    package: str
    description: str
    breakdowns: list[Breakdown]
    grains: list[Grain]
    aggregation: Aggregation
    program_scoped: bool
    split: str | None = Field(
        default=None, description="Dimension the metric is always split by (keys never null)"
    )
    needs_segments: bool = Field(
        default=False, description="Whether requests must name segment_a and segment_b"
    )


class PlannedMetricRead(BaseModel):
    """A metric the dashboards will show once its package is installed."""

    name: str
    title: str
    package: str
    dashboard: str


class MetricCatalogueRead(BaseModel):
    """The catalogue: registered metrics and the ones still to come."""

    metrics: list[MetricRead]
    planned: list[PlannedMetricRead]


class KpiPoint(BaseModel):
    """One value of a series: a period, a breakdown key (or null) and the value."""

    period: date
    key: str | None
    value: float | int


class KpiSeriesRead(BaseModel):
    """The values of a metric over a date range."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True)

    metric: str
    title: str
    unit: str
    grain: Grain
    breakdown: Breakdown | None
    split: str | None = Field(default=None, description="The metric's own split dimension")
    program_id: str | None
    segments: list[str] | None = Field(default=None, description="segment_a, segment_b")
    start: date = Field(alias="from")
    end: date = Field(alias="to")
    keys: list[str] = Field(description="Breakdown values, largest first; empty without one")
    points: list[KpiPoint]
    total: float | int | None = Field(
        description="Sum over the range for counts, latest period for levels, null otherwise"
    )
    snapshot_days: list[date] = Field(description="Days served from KPI snapshots")


class FixedRange(BaseModel):
    """An explicit date range, both days included."""

    model_config = ConfigDict(serialize_by_alias=True, validate_by_name=True, extra="forbid")

    start: date = Field(alias="from")
    end: date = Field(alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> FixedRange:
        if self.end < self.start:
            raise ValueError("'to' is before 'from'")
        if (self.end - self.start).days >= MAX_RANGE_DAYS:
            raise ValueError(f"a range covers at most {MAX_RANGE_DAYS} days")
        return self


class Widget(BaseModel):
    """One chart of a dashboard."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, max_length=200)
    metric: str = Field(min_length=1, max_length=100)
    breakdown: Breakdown | None = None
    grain: Grain = "day"
    range: RangePreset | FixedRange = "30d"
    chart: ChartType = "line"


class DashboardCreate(BaseModel):
    """Body of a custom dashboard creation."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    widgets: list[Widget] = Field(min_length=1, max_length=24)


class DashboardUpdate(DashboardCreate):
    """Body of a custom dashboard replacement (PUT)."""


class DashboardRead(BaseModel):
    """A saved custom dashboard."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    title: str
    description: str | None
    widgets: list[Widget]
    created_by: str | None
    created_at: datetime
    updated_at: datetime
