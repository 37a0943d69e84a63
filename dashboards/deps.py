"""FastAPI dependencies of the dashboards: KPI query parameters and the web session."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import Depends, Query, Request, Response

from cdp.auth import Principal
from cdp.db import SessionDep, get_db
from cdp.deps import WarehouseDep
from dashboards import service
from dashboards.metrics import Breakdown, Grain
from dashboards.schemas import KpiSeriesRead

SESSION_COOKIE = "cdp_dashboards_session"


class KpiParams:
    """Query parameters of a KPI series request."""

    def __init__(
        self,
        start: Annotated[date | None, Query(alias="from", description="First day (UTC)")] = None,
        end: Annotated[date | None, Query(alias="to", description="Last day, included")] = None,
        grain: Annotated[Grain, Query(description="Period length")] = "day",
        breakdown: Annotated[Breakdown | None, Query(description="Split by")] = None,
        program_id: Annotated[str | None, Query(max_length=100)] = None,
        segment_a: Annotated[
            str | None, Query(max_length=100, description="First segment (overlap metrics)")
        ] = None,
        segment_b: Annotated[
            str | None, Query(max_length=100, description="Second segment (overlap metrics)")
        ] = None,
        format: Annotated[Literal["json", "csv"], Query(description="Response format")] = "json",
    ) -> None:
        default_start, default_end = service.default_range()
        self.start = start or (end - (default_end - default_start) if end else default_start)
        self.end = end or default_end
        self.grain = grain
        self.breakdown = breakdown
        self.program_id = program_id or None
        self.segments = (segment_a, segment_b) if segment_a and segment_b else None
        self.format = format


KpiParamsDep = Annotated[KpiParams, Depends()]


def kpi_response(
    session: SessionDep, warehouse: WarehouseDep, metric: str, params: KpiParams
) -> KpiSeriesRead | Response:
    """Compute a series and answer it as JSON or CSV (shared with the web pages)."""
    series = service.kpi_series(
        session,
        warehouse=warehouse,
        metric=metric,
        start=params.start,
        end=params.end,
        grain=params.grain,
        breakdown=params.breakdown,
        program_id=params.program_id,
        segments=params.segments,
    )
    if params.format == "csv":
        filename = f"{metric}_{params.start}_{params.end}.csv"
        return Response(
            service.series_csv(series),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )
    return service.series_read(series)


def session_token(request: Request) -> str | None:
    """The dashboard session token sent by the browser, if any."""
    return request.cookies.get(SESSION_COOKIE)


# Both read the sign-in in a transaction of their own, not the request's: a pooled connection
# held from a dependency's worker thread to the endpoint's waits for a thread while every
# thread may be waiting for a connection (see `cdp.auth.RequireRole`).


def find_page_principal(request: Request) -> Principal | None:
    """Who is signed in to the web pages, or None (pages then redirect to the sign-in)."""
    token = session_token(request)
    if not token:
        return None
    with get_db(request).begin() as session:
        return service.find_session_principal(session, token=token)


def page_api_principal(request: Request) -> Principal:
    """Who is signed in, for the pages' own data routes; 401 otherwise."""
    with get_db(request).begin() as session:
        return service.session_principal(session, token=session_token(request))


PagePrincipalDep = Annotated[Principal | None, Depends(find_page_principal)]
