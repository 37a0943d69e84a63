"""Use cases of the dashboards: KPI series, the catalogue, custom dashboards, web sessions."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import polars as pl
from sqlalchemy import Select, delete, func, select
from sqlalchemy.orm import Session

from cdp.auth import ApiKey, Principal, Role, authenticate
from cdp.db import new_id, utcnow
from cdp.warehouse import Query, Warehouse
from dashboards import queries
from dashboards.errors import (
    DashboardNotFound,
    InvalidRange,
    NotSignedIn,
    SegmentsRequired,
    UnknownMetric,
    UnknownProgram,
    UnknownSegment,
    UnsupportedBreakdown,
    UnsupportedGrain,
)
from dashboards.metrics import PLANNED, Breakdown, Catalogue, Grain, Metric, PlannedMetric
from dashboards.metrics import catalogue as default_catalogue
from dashboards.models import Dashboard, WebSession
from dashboards.schemas import (
    MAX_RANGE_DAYS,
    DashboardCreate,
    KpiPoint,
    KpiSeriesRead,
    MetricRead,
    Widget,
)
from loyalty import service as loyalty_service
from segments import service as segments_service

logger = logging.getLogger(__name__)

SERIES_SCHEMA: dict[str, pl.DataType] = {
    "period": pl.Date(),
    "key": pl.String(),
    "value": pl.Float64(),
}
_POLARS_GRAIN = {"day": "1d", "week": "1w", "month": "1mo"}
SESSION_LIFETIME = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class KpiSeries:
    """A metric's values over a range: `frame` has `period`, `key`, `value`, sorted."""

    metric: Metric
    start: date
    end: date
    grain: Grain
    breakdown: Breakdown | None
    program_id: str | None
    frame: pl.DataFrame
    keys: list[str]
    segments: tuple[str, str] | None
    total: float | None
    snapshot_days: list[date]


def today() -> date:
    """The current UTC day."""
    return datetime.now(UTC).date()


def default_range(days: int = 30, *, until: date | None = None) -> tuple[date, date]:
    """The `days` days ending today (UTC), both included."""
    end = until or today()
    return end - timedelta(days=days - 1), end


def get_metric(name: str, *, catalogue: Catalogue | None = None) -> Metric:
    """The metric of this name, or UnknownMetric (422)."""
    metric = (catalogue or default_catalogue()).find(name)
    if metric is None:
        raise UnknownMetric(
            f"unknown metric {name!r}; GET /api/dashboards/metrics lists them",
            details={"metric": name},
        )
    return metric


def check_widget(metric: Metric, *, breakdown: Breakdown | None, grain: Grain) -> None:
    """Raise a 422 error when the metric does not offer this breakdown or grain."""
    if breakdown is not None and breakdown not in metric.breakdowns:
        raise UnsupportedBreakdown(
            f"metric {metric.name} has no breakdown {breakdown!r}; "
            f"it offers: {', '.join(metric.breakdowns) or 'none'}",
            details={"metric": metric.name, "breakdown": breakdown},
        )
    if grain not in metric.grains:
        raise UnsupportedGrain(
            f"metric {metric.name} has no grain {grain!r}",
            details={"metric": metric.name, "grain": grain},
        )


def list_metrics(*, catalogue: Catalogue | None = None) -> tuple[list[Metric], list[PlannedMetric]]:
    """Registered metrics, and the planned ones no package has registered yet."""
    metrics = (catalogue or default_catalogue()).all()
    names = {m.name for m in metrics}
    return metrics, [p for p in PLANNED if p.name not in names]


def _frame_of_rows(rows: list[tuple[object, ...]]) -> pl.DataFrame:
    """A series frame from operational rows (dates come back as text on SQLite)."""
    raw = pl.DataFrame(
        rows, schema=["period", "key", "value"], orient="row", infer_schema_length=None
    )
    if raw.is_empty():
        return pl.DataFrame(schema=SERIES_SCHEMA)
    period = pl.col("period")
    if raw.schema["period"] == pl.String:
        period = period.str.to_date("%Y-%m-%d")
    return raw.select(
        period.cast(pl.Date).alias("period"),
        pl.col("key").cast(pl.String),
        pl.col("value").cast(pl.Float64),
    )


def run_metric(
    session: Session,
    *,
    warehouse: Warehouse,
    metric: Metric,
    start: date,
    end: date,
    grain: Grain,
    breakdown: Breakdown | None,
    program_id: str | None,
    segments: tuple[str, str] | None = None,
) -> pl.DataFrame:
    """Run a metric's statement on its store; the raw `period`, `key`, `value` frame."""
    statement: Query | Select[*tuple[object, ...]]
    if metric.pair_build is not None:
        if segments is None:
            raise SegmentsRequired(f"metric {metric.name} needs segment_a and segment_b")
        statement = metric.pair_build(
            start=start, end=end, grain=grain, segment_a=segments[0], segment_b=segments[1]
        )
    else:
        statement = metric.build(
            start=start, end=end, grain=grain, breakdown=breakdown, program_id=program_id
        )
    if isinstance(statement, Query):
        if metric.store != "warehouse":
            raise TypeError(f"metric {metric.name} built a warehouse query for {metric.store}")
        frame = warehouse.run(statement)
        if frame.is_empty():
            return pl.DataFrame(schema=SERIES_SCHEMA)
        return frame.select(
            pl.col("period").cast(pl.Date),
            pl.col("key").cast(pl.String),
            pl.col("value").cast(pl.Float64),
        )
    if not isinstance(statement, Select) or metric.store != "operational":
        raise TypeError(f"metric {metric.name} built {type(statement).__name__}")
    return _frame_of_rows([tuple(r) for r in session.execute(statement).all()])


def _roll_up(frame: pl.DataFrame, *, grain: Grain, metric: Metric) -> pl.DataFrame:
    """Combine daily values into the grain's periods (sum of counts, last level)."""
    if grain == "day" or frame.is_empty():
        return frame
    truncated = frame.with_columns(pl.col("period").dt.truncate(_POLARS_GRAIN[grain]))
    if metric.aggregation == "last":
        return (
            frame.sort("period")
            .with_columns(pl.col("period").dt.truncate(_POLARS_GRAIN[grain]).alias("bucket"))
            .group_by("bucket", "key", maintain_order=True)
            .agg(pl.col("value").last())
            .rename({"bucket": "period"})
        )
    return truncated.group_by("period", "key").agg(pl.col("value").sum())


def _periods(start: date, end: date, grain: Grain) -> pl.Series:
    first = pl.Series([start]).dt.truncate(_POLARS_GRAIN[grain])[0]
    return pl.date_range(first, end, _POLARS_GRAIN[grain], eager=True).alias("period")


def _densify(
    frame: pl.DataFrame, *, start: date, end: date, grain: Grain, keys: list[str | None]
) -> pl.DataFrame:
    """Every period of the range for every key, zero where nothing was counted."""
    grid = pl.DataFrame(_periods(start, end, grain)).join(
        pl.DataFrame({"key": keys}, schema={"key": pl.String}), how="cross"
    )
    return grid.join(frame, on=["period", "key"], how="left", nulls_equal=True).with_columns(
        pl.col("value").fill_null(0.0)
    )


def kpi_series(
    session: Session,
    *,
    warehouse: Warehouse,
    metric: str,
    start: date,
    end: date,
    grain: Grain = "day",
    breakdown: Breakdown | None = None,
    program_id: str | None = None,
    segments: tuple[str, str] | None = None,
    catalogue: Catalogue | None = None,
) -> KpiSeries:
    """A metric's series over `start`..`end`, raw data first and snapshots for days gone.

    Counts (`sum`) and levels (`last`) are read per day and combined into the grain here, so
    days served from snapshots combine exactly with raw days; `distinct` metrics are computed
    by SQL at the grain and use snapshots only at day grain.
    """
    found = get_metric(metric, catalogue=catalogue)
    check_widget(found, breakdown=breakdown, grain=grain)
    if end < start:
        raise InvalidRange(
            "'to' is before 'from'", details={"from": start.isoformat(), "to": end.isoformat()}
        )
    if (end - start).days >= MAX_RANGE_DAYS:
        raise InvalidRange(f"a range covers at most {MAX_RANGE_DAYS} days")
    scope = program_id if found.program_scoped else None
    if scope is not None and loyalty_service.find_program(session, program_id=scope) is None:
        raise UnknownProgram(
            f"loyalty programme {scope!r} does not exist", details={"program_id": scope}
        )
    pair = _segment_pair(session, found, segments)
    sql_grain: Grain = grain if found.aggregation == "distinct" else "day"
    frame = run_metric(
        session,
        warehouse=warehouse,
        metric=found,
        start=start,
        end=end,
        grain=sql_grain,
        breakdown=breakdown,
        program_id=scope,
        segments=pair,
    )
    snapshot_days: list[date] = []
    if found.snapshot and scope is None and pair is None and sql_grain == "day":
        stored = warehouse.run(
            queries.snapshot_rows(metric=found.name, breakdown=breakdown, start=start, end=end)
        )
        if not stored.is_empty():
            # A day is read from snapshots only when no raw row of it is left.
            gone = stored.select(
                pl.col("period").cast(pl.Date), pl.col("key"), pl.col("value")
            ).join(frame.select("period").unique(), on="period", how="anti")
            snapshot_days = gone.get_column("period").unique().sort().to_list()
            frame = pl.concat([frame, gone], how="vertical")
    frame = _roll_up(frame, grain=grain, metric=found)
    split = breakdown is not None or found.split is not None
    if split:
        frame = frame.with_columns(pl.col("key").fill_null("(none)"))
    ranked = (
        frame.group_by("key").agg(pl.col("value").sum()).sort(["value", "key"], descending=True)
    )
    keys: list[str | None] = ranked.get_column("key").to_list() if split else [None]
    if found.split_keys:
        keys = [*found.split_keys, *(k for k in keys if k not in found.split_keys)]
    if found.aggregation == "sum":
        frame = _densify(frame, start=start, end=end, grain=grain, keys=keys)
    frame = frame.sort(["period", "key"], nulls_last=True)
    total: float | None = None
    if found.aggregation == "sum":
        total = float(frame.get_column("value").sum())
    elif found.aggregation == "last" and not frame.is_empty():
        latest = frame.get_column("period").max()
        total = float(frame.filter(pl.col("period") == latest).get_column("value").sum())
    if found.integer:
        frame = frame.with_columns(pl.col("value").round().cast(pl.Int64))
        total = None if total is None else round(total)
    return KpiSeries(
        metric=found,
        start=start,
        end=end,
        grain=grain,
        breakdown=breakdown,
        program_id=program_id,
        frame=frame.select("period", "key", "value"),
        keys=[k for k in keys if k is not None],
        segments=pair,
        total=total,
        snapshot_days=snapshot_days,
    )


def _segment_pair(
    session: Session, metric: Metric, segments: tuple[str, str] | None
) -> tuple[str, str] | None:
    """The two segments of a metric about a pair, checked; None for other metrics."""
    if metric.pair_build is None:
        return None
    if segments is None or not all(segments):
        raise SegmentsRequired(
            f"metric {metric.name} compares two saved segments: give segment_a and segment_b",
            details={"metric": metric.name},
        )
    for segment_id in segments:
        if segments_service.find_segment(session, segment_id=segment_id) is None:
            raise UnknownSegment(
                f"segment {segment_id!r} does not exist", details={"segment": segment_id}
            )
    return segments


def series_csv(series: KpiSeries) -> str:
    """The series as CSV: `period`, the breakdown (if any) and `value`."""
    column = series.breakdown or series.metric.split or "key"
    frame = series.frame.rename({"key": column})
    if series.breakdown is None and series.metric.split is None:
        frame = frame.drop(column)
    return frame.write_csv()


def validate_widgets(widgets: list[Widget], *, catalogue: Catalogue | None = None) -> None:
    """Check each widget's metric, breakdown and grain against the catalogue (422 otherwise)."""
    for index, widget in enumerate(widgets):
        try:
            metric = get_metric(widget.metric, catalogue=catalogue)
            check_widget(metric, breakdown=widget.breakdown, grain=widget.grain)
        except (UnknownMetric, UnsupportedBreakdown, UnsupportedGrain) as exc:
            exc.details = {"widget": index, **(exc.details or {})}
            exc.message = f"widgets[{index}]: {exc.message}"
            raise


def create_dashboard(
    session: Session, *, body: DashboardCreate, created_by: str | None
) -> Dashboard:
    """Save a custom dashboard after checking its widgets."""
    validate_widgets(body.widgets)
    now = utcnow()
    dashboard = Dashboard(
        id=new_id(),
        title=body.title,
        description=body.description,
        widgets=[w.model_dump(mode="json", by_alias=True) for w in body.widgets],
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
    session.add(dashboard)
    session.flush()
    logger.info("dashboard created", extra={"dashboard_id": dashboard.id})
    return dashboard


def list_dashboards(session: Session, *, limit: int, offset: int) -> tuple[list[Dashboard], int]:
    """Custom dashboards, newest first, with the total count."""
    total = session.scalar(select(func.count()).select_from(Dashboard)) or 0
    rows = session.scalars(
        select(Dashboard)
        .order_by(Dashboard.created_at.desc(), Dashboard.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), total


def get_dashboard(session: Session, *, dashboard_id: str) -> Dashboard:
    """The custom dashboard with this id, or DashboardNotFound."""
    dashboard = session.get(Dashboard, dashboard_id)
    if dashboard is None:
        raise DashboardNotFound(f"dashboard {dashboard_id} does not exist")
    return dashboard


def update_dashboard(session: Session, *, dashboard_id: str, body: DashboardCreate) -> Dashboard:
    """Replace a custom dashboard's title, description and widgets."""
    dashboard = get_dashboard(session, dashboard_id=dashboard_id)
    validate_widgets(body.widgets)
    dashboard.title = body.title
    dashboard.description = body.description
    dashboard.widgets = [w.model_dump(mode="json", by_alias=True) for w in body.widgets]
    dashboard.updated_at = utcnow()
    return dashboard


def delete_dashboard(session: Session, *, dashboard_id: str) -> None:
    """Delete a custom dashboard."""
    session.delete(get_dashboard(session, dashboard_id=dashboard_id))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(session: Session, *, api_key: str) -> tuple[str, WebSession]:
    """Open a web session for a valid API key; returns the cookie token (never stored)."""
    key = authenticate(session, clear=api_key.strip())
    token = secrets.token_urlsafe(32)
    now = utcnow()
    key.last_used_at = now  # this transaction writes anyway
    web_session = WebSession(
        token_hash=_token_hash(token),
        key_id=key.id,
        created_at=now,
        expires_at=now + SESSION_LIFETIME,
    )
    session.add(web_session)
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    logger.info("dashboard sign-in", extra={"key_id": key.id})
    return token, web_session


def find_session_principal(session: Session, *, token: str) -> Principal | None:
    """Who a session cookie belongs to; None if unknown, expired or its key was revoked."""
    web_session = session.get(WebSession, _token_hash(token))
    if web_session is None or web_session.expires_at <= utcnow():
        return None
    key = session.get(ApiKey, web_session.key_id)
    if key is None or key.revoked_at is not None:
        return None
    return Principal(key_id=key.id, name=key.name, role=Role(key.role))


def session_principal(session: Session, *, token: str | None) -> Principal:
    """Who a session cookie belongs to, or NotSignedIn (401)."""
    principal = find_session_principal(session, token=token) if token else None
    if principal is None:
        raise NotSignedIn("not signed in, or the session expired: sign in at /dashboards/sign-in")
    return principal


def sign_out(session: Session, *, token: str | None) -> None:
    """Close a web session (a missing or unknown one is fine)."""
    if token:
        session.execute(delete(WebSession).where(WebSession.token_hash == _token_hash(token)))


SNAPSHOT_LOOKBACK_DAYS = 400
_SNAPSHOT_KEY = ["day", "breakdown", "key"]


def _snapshot_frame(
    session: Session, warehouse: Warehouse, *, metric: Metric, start: date, until: date
) -> pl.DataFrame:
    """`day, breakdown, key, value` of a metric's raw data over `start`..`until`, every
    breakdown; only days with raw rows. Levels known only now are stored as `until`'s value."""
    first, last = (today(), today()) if metric.now_only else (start, until)
    frames = []
    for breakdown in (None, *metric.breakdowns):
        frame = run_metric(
            session,
            warehouse=warehouse,
            metric=metric,
            start=first,
            end=last,
            grain="day",
            breakdown=breakdown,
            program_id=None,
        )
        frames.append(frame.with_columns(pl.lit(breakdown or "").alias("breakdown")))
    days = frames[0].get_column("period").unique()
    staged = (
        pl.concat(frames, how="vertical")
        .filter(pl.col("period").is_in(days.implode()))
        .select(pl.col("period").alias("day"), "breakdown", "key", "value")
    )
    if metric.now_only:
        staged = staged.with_columns(pl.lit(until, dtype=pl.Date).alias("day"))
    return staged


def _changed_days(staged: pl.DataFrame, stored: pl.DataFrame) -> list[date]:
    """Days of `staged` whose rows differ from the stored ones (new, changed or gone keys)."""
    days = staged.get_column("day").unique()
    stored = stored.filter(pl.col("day").is_in(days.implode()))
    joined = staged.join(stored, on=_SNAPSHOT_KEY, how="full", nulls_equal=True, suffix="_old")
    day = pl.coalesce("day", "day_old")
    differs = (
        pl.col("value").is_null()
        | pl.col("value_old").is_null()
        | ((pl.col("value") - pl.col("value_old")).abs() > 1e-9)
    )
    return joined.filter(differs).select(day.alias("day")).unique().sort("day")["day"].to_list()


def take_snapshots(
    session: Session,
    *,
    warehouse: Warehouse,
    until: date | None = None,
    catalogue: Catalogue | None = None,
) -> int:
    """Store the daily values of every metric for the closed days up to `until` (default
    yesterday, UTC), idempotently.

    Every run looks at the whole lookback window (`SNAPSHOT_LOOKBACK_DAYS` days ending at
    `until`), each metric with no breakdown and with every breakdown it offers, and rewrites
    the days whose raw values differ from what is stored: new days, late data, and history
    loaded or backfilled after the fact (metrics bucketed by event time, such as the ledger or
    `events_occurred`, gain old days when old events arrive). Days without raw data are never
    touched, so a day whose raw data is gone keeps the values stored earlier. Levels known only
    now (`now_only`) are stored as `until`'s value. Returns the number of rows written (0 when
    nothing changed since the last run).
    """
    until = until or today() - timedelta(days=1)
    start = until - timedelta(days=SNAPSHOT_LOOKBACK_DAYS - 1)
    taken_at = utcnow().replace(tzinfo=None)
    written = 0
    for metric in (catalogue or default_catalogue()).all():
        if not metric.snapshot or (metric.now_only and until != today() - timedelta(days=1)):
            continue  # a level known only now is yesterday's closing value, no older day's
        staged = _snapshot_frame(session, warehouse, metric=metric, start=start, until=until)
        if staged.is_empty():
            continue
        stored = warehouse.run(queries.stored_snapshots(metric=metric.name, start=start, end=until))
        days = _changed_days(
            staged,
            stored.select(
                pl.col("day").cast(pl.Date),
                pl.col("breakdown").cast(pl.String),
                pl.col("key").cast(pl.String),
                pl.col("value").cast(pl.Float64),
            ),
        )
        if not days:
            continue
        rows = staged.filter(pl.col("day").is_in(days)).select(
            pl.lit(metric.name).alias("metric"),
            "day",
            "breakdown",
            "key",
            pl.lit("").alias("program_id"),
            "value",
            pl.lit(taken_at).alias("taken_at"),
        )
        with warehouse.transaction() as cur:
            delete_days = queries.delete_snapshot_days(metric=metric.name, days=days)
            cur.execute(delete_days.sql, delete_days.params)
            cur.register(queries.STAGED_SNAPSHOTS, rows.to_arrow())
            try:
                cur.execute(queries.insert_snapshots().sql)
            finally:
                cur.unregister(queries.STAGED_SNAPSHOTS)
        written += rows.height
        logger.info(
            "kpi snapshots stored",
            extra={"metric": metric.name, "days": len(days), "rows": rows.height},
        )
    return written


def series_read(series: KpiSeries) -> KpiSeriesRead:
    """The API form of a series."""
    return KpiSeriesRead(
        metric=series.metric.name,
        title=series.metric.title,
        unit=series.metric.unit,
        grain=series.grain,
        breakdown=series.breakdown,
        split=series.metric.split,
        program_id=series.program_id,
        segments=list(series.segments) if series.segments else None,
        start=series.start,
        end=series.end,
        keys=series.keys,
        points=[KpiPoint.model_validate(row) for row in series.frame.to_dicts()],
        total=series.total,
        snapshot_days=series.snapshot_days,
    )


def metric_read(metric: Metric) -> MetricRead:
    """The API form of a catalogue entry."""
    return MetricRead(
        name=metric.name,
        title=metric.title,
        unit=metric.unit,
        store=metric.store,
        package=metric.package,
        description=metric.description,
        breakdowns=list(metric.breakdowns),
        grains=list(metric.grains),
        aggregation=metric.aggregation,
        program_scoped=metric.program_scoped,
        split=metric.split,
        needs_segments=metric.pair_build is not None,
    )
