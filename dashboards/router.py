"""HTTP routes of the dashboards package: the metric catalogue, KPI series, custom dashboards.

`router` also carries the web pages (`dashboards.pages`), so the app mounts one router.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from cdp.auth import ANY_ROLE, Principal, Role, require
from cdp.db import SessionDep
from cdp.deps import WarehouseDep
from cdp.pagination import Page, PageDep
from dashboards import pages, service
from dashboards.deps import KpiParamsDep, kpi_response
from dashboards.schemas import (
    DashboardCreate,
    DashboardRead,
    DashboardUpdate,
    KpiSeriesRead,
    MetricCatalogueRead,
    PlannedMetricRead,
)

READERS = require(*ANY_ROLE)
# Viewers read; the roles that work with data may save dashboards.
EDITORS = require(Role.data, Role.marketer, Role.loyalty)
EditorDep = Annotated[Principal, Depends(EDITORS)]

kpi_router = APIRouter(prefix="/api/kpis", tags=["dashboards"], dependencies=[Depends(READERS)])
dashboards_router = APIRouter(
    prefix="/api/dashboards", tags=["dashboards"], dependencies=[Depends(READERS)]
)


@kpi_router.get("/{metric}", response_model=KpiSeriesRead)
def get_kpi(
    metric: str, session: SessionDep, warehouse: WarehouseDep, params: KpiParamsDep
) -> KpiSeriesRead | Response:
    """A metric's values per period over `from`..`to` (default: the last 30 days)."""
    return kpi_response(session, warehouse, metric, params)


@dashboards_router.get("/metrics")
def list_metrics() -> MetricCatalogueRead:
    """The metric catalogue, and the metrics that arrive with packages not installed yet."""
    metrics, planned = service.list_metrics()
    return MetricCatalogueRead(
        metrics=[service.metric_read(m) for m in metrics],
        planned=[
            PlannedMetricRead(name=p.name, title=p.title, package=p.package, dashboard=p.dashboard)
            for p in planned
        ],
    )


@dashboards_router.post("", status_code=201)
def create_dashboard(
    body: DashboardCreate, session: SessionDep, principal: EditorDep
) -> DashboardRead:
    """Save a custom dashboard; every widget is checked against the catalogue."""
    dashboard = service.create_dashboard(session, body=body, created_by=principal.key_id)
    return DashboardRead.model_validate(dashboard)


@dashboards_router.get("")
def list_dashboards(session: SessionDep, page: PageDep) -> Page[DashboardRead]:
    """Custom dashboards, newest first."""
    rows, total = service.list_dashboards(session, limit=page.limit, offset=page.offset)
    return Page[DashboardRead].of(
        [DashboardRead.model_validate(r) for r in rows], total=total, params=page
    )


@dashboards_router.get("/{dashboard_id}")
def get_dashboard(dashboard_id: str, session: SessionDep) -> DashboardRead:
    """One custom dashboard."""
    return DashboardRead.model_validate(service.get_dashboard(session, dashboard_id=dashboard_id))


@dashboards_router.put("/{dashboard_id}", dependencies=[Depends(EDITORS)])
def replace_dashboard(
    dashboard_id: str, body: DashboardUpdate, session: SessionDep
) -> DashboardRead:
    """Replace a custom dashboard's title, description and widgets."""
    dashboard = service.update_dashboard(session, dashboard_id=dashboard_id, body=body)
    return DashboardRead.model_validate(dashboard)


@dashboards_router.delete("/{dashboard_id}", status_code=204, dependencies=[Depends(EDITORS)])
def delete_dashboard(dashboard_id: str, session: SessionDep) -> Response:
    """Delete a custom dashboard."""
    service.delete_dashboard(session, dashboard_id=dashboard_id)
    return Response(status_code=204)


router = APIRouter()
router.include_router(kpi_router)
router.include_router(dashboards_router)
router.include_router(pages.api_router)
router.include_router(pages.router)
