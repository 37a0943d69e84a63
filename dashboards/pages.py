"""The web pages at `/dashboards`: sign-in, standard and custom dashboards, their data routes.

Pages are server-rendered Jinja2 templates; `static/dashboards.js` fetches each widget's
series from `/dashboards/api/kpis/...`, which answers exactly what `GET /api/kpis/...`
answers (same function), authenticated by the session cookie instead of a bearer key.
"""

from __future__ import annotations

import json
import mimetypes
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlparse

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from cdp.auth import Principal
from cdp.db import SessionDep
from cdp.deps import WarehouseDep
from cdp.errors import Unauthorized
from dashboards import service
from dashboards.deps import (
    SESSION_COOKIE,
    KpiParamsDep,
    PagePrincipalDep,
    kpi_response,
    page_api_principal,
    session_token,
)
from dashboards.errors import DashboardNotFound
from dashboards.metrics import PLANNED, PlannedMetric, catalogue
from dashboards.schemas import PRESET_DAYS, FixedRange, KpiSeriesRead, Widget
from dashboards.standard import BY_SLUG, STANDARD
from loyalty import service as loyalty_service
from segments import service as segments_service

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_FILES: dict[str, Path] = {
    p.relative_to(STATIC_DIR).as_posix(): p for p in STATIC_DIR.rglob("*") if p.is_file()
}
templates = Jinja2Templates(directory=PACKAGE_DIR / "templates")

SECURITY_HEADERS = {
    # Everything the pages use is served from here: no CDN, no inline script.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
MAX_CHOICES = 200  # programmes and segments listed in the selectors
RANGE_PRESETS = (("7d", "7 days"), ("30d", "30 days"), ("90d", "90 days"), ("365d", "1 year"))

router = APIRouter(prefix="/dashboards", tags=["dashboard pages"], include_in_schema=False)
api_router = APIRouter(
    prefix="/dashboards/api",
    tags=["dashboard pages"],
    include_in_schema=False,
    dependencies=[Depends(page_api_principal)],
)


@dataclass(frozen=True, slots=True)
class WidgetView:
    """What the template needs to lay out one widget."""

    id: str
    title: str
    metric: str
    unit: str
    chart: str
    grain: str
    breakdown: str | None
    start: date
    end: date
    data_url: str
    csv_url: str


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    response = templates.TemplateResponse(request, name, context, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    return response


def _to_sign_in(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/dashboards/sign-in?{urlencode({'next': target})}", 303)


def _safe_next(target: str | None) -> str:
    """Only local dashboard paths are followed after sign-in."""
    if target and target.startswith("/dashboards") and "//" not in target and "\\" not in target:
        return target
    return "/dashboards"


def _widget_range(widget: Widget, page_range: tuple[date, date] | None) -> tuple[date, date]:
    if page_range is not None:
        return page_range
    if isinstance(widget.range, FixedRange):
        return widget.range.start, widget.range.end
    return service.default_range(PRESET_DAYS[widget.range])


@dataclass(frozen=True, slots=True)
class Choices:
    """What the page-wide selectors offer and which values are chosen."""

    programs: list[tuple[str, str]]
    program_id: str | None
    segments: list[tuple[str, str]]
    segment_pair: tuple[str, str] | None


def _choices(
    session: Session,
    *,
    program_id: str | None,
    segment_a: str | None,
    segment_b: str | None,
) -> Choices:
    """Programmes and saved segments for the selectors; unknown choices fall back to defaults.

    Without a chosen pair, the overlap compares the first two segments by name.
    """
    programs, _ = loyalty_service.list_programs(session, limit=MAX_CHOICES, offset=0)
    segments, _ = segments_service.list_segments(session, limit=MAX_CHOICES, offset=0)
    program_ids = {p.id for p in programs}
    segment_ids = [s.id for s in segments]
    pair: tuple[str, str] | None = None
    if segment_a in segment_ids and segment_b in segment_ids:
        pair = (str(segment_a), str(segment_b))
    elif len(segment_ids) >= 2:
        pair = (segment_ids[0], segment_ids[1])
    return Choices(
        programs=[(p.id, p.name) for p in programs],
        program_id=program_id if program_id in program_ids else None,
        segments=[(s.id, s.name) for s in segments],
        segment_pair=pair,
    )


def _views(
    widgets: tuple[Widget, ...] | list[Widget],
    page_range: tuple[date, date] | None,
    program_id: str | None,
    segment_pair: tuple[str, str] | None = None,
) -> tuple[list[WidgetView], list[Widget]]:
    """Views of the widgets whose metric exists (and, for overlaps, has a pair of segments),
    and the widgets left out."""
    views: list[WidgetView] = []
    missing: list[Widget] = []
    for index, widget in enumerate(widgets):
        metric = catalogue().find(widget.metric)
        if metric is None or (metric.pair_build is not None and segment_pair is None):
            missing.append(widget)
            continue
        start, end = _widget_range(widget, page_range)
        params: dict[str, str] = {"from": start.isoformat(), "to": end.isoformat()}
        params["grain"] = widget.grain
        if widget.breakdown:
            params["breakdown"] = widget.breakdown
        if program_id and metric.program_scoped:
            params["program_id"] = program_id
        if metric.pair_build is not None and segment_pair is not None:
            params["segment_a"], params["segment_b"] = segment_pair
        base = f"/dashboards/api/kpis/{metric.name}?"
        views.append(
            WidgetView(
                id=f"w{index}",
                title=widget.title or metric.title,
                metric=metric.name,
                unit=metric.unit,
                chart=widget.chart,
                grain=widget.grain,
                breakdown=widget.breakdown,
                start=start,
                end=end,
                data_url=base + urlencode(params),
                csv_url=base + urlencode({**params, "format": "csv"}),
            )
        )
    return views, missing


def _script_json(data: object) -> str:
    """JSON safe to place inside a <script> element (titles are user text)."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _page_range(start: date | None, end: date | None) -> tuple[date, date] | None:
    if start is None and end is None:
        return None
    default_start, default_end = service.default_range()
    end = end or default_end
    start = start or end - (default_end - default_start)
    return (end, start) if end < start else (start, end)


def _render(
    request: Request,
    principal: Principal,
    *,
    slug: str,
    title: str,
    summary: str | None,
    widgets: tuple[Widget, ...] | list[Widget],
    page_range: tuple[date, date] | None,
    program_selector: bool,
    choices: Choices,
    planned: list[PlannedMetric],
) -> Response:
    metrics = [catalogue().find(w.metric) for w in widgets]
    program_selector = program_selector or any(m and m.program_scoped for m in metrics)
    segment_selector = any(m and m.pair_build is not None for m in metrics)
    program_id = choices.program_id if program_selector else None
    pair = choices.segment_pair if segment_selector else None
    views, missing = _views(widgets, page_range, program_id, pair)
    needs_segments = segment_selector and pair is None
    missing = [w for w in missing if catalogue().find(w.metric) is None]
    missing_names = {w.metric for w in missing}
    listed = {p.name for p in planned}
    coming = planned + [p for p in PLANNED if p.name in missing_names and p.name not in listed]
    unknown = sorted(missing_names - {p.name for p in coming})
    shown = page_range or (
        (min(v.start for v in views), max(v.end for v in views))
        if views
        else service.default_range()
    )
    config = {
        "widgets": [
            {
                "id": v.id,
                "title": v.title,
                "metric": v.metric,
                "unit": v.unit,
                "chart": v.chart,
                "grain": v.grain,
                "breakdown": v.breakdown,
                "dataUrl": v.data_url,
                "csvUrl": v.csv_url,
            }
            for v in views
        ]
    }
    packages: dict[str, list[PlannedMetric]] = {}
    for item in coming:
        packages.setdefault(item.package, []).append(item)
    keep: dict[str, str] = {}
    if program_id:
        keep["program_id"] = program_id
    if pair:
        keep["segment_a"], keep["segment_b"] = pair
    return _page(
        request,
        "dashboard.html",
        {
            "principal": principal,
            "nav": STANDARD,
            "active": slug,
            "title": title,
            "summary": summary,
            "widgets": views,
            "coming": packages,
            "unknown": unknown,
            "range_from": shown[0].isoformat(),
            "range_to": shown[1].isoformat(),
            "presets": [
                (key, label, *(d.isoformat() for d in service.default_range(PRESET_DAYS[key])))
                for key, label in RANGE_PRESETS
            ],
            "program_selector": program_selector,
            "program_id": program_id,
            "programs": choices.programs,
            "segment_selector": segment_selector,
            "segments": choices.segments,
            "segment_pair": pair,
            "needs_segments": needs_segments,
            "keep_query": ("&" + urlencode(keep)) if keep else "",
            "config_json": _script_json(config),
        },
    )


@router.get("/static/{path:path}")
def static_file(path: str) -> Response:
    """A file shipped in the package (styles, scripts, the vendored chart library)."""
    file = STATIC_FILES.get(path)
    if file is None:
        return Response("not found", status_code=404, media_type="text/plain")
    media_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media_type, headers={"Cache-Control": "max-age=3600"})


@router.get("/sign-in")
def sign_in_page(
    request: Request,
    principal: PagePrincipalDep,
    next: Annotated[str | None, Query(max_length=500)] = None,
) -> Response:
    """The sign-in form (signed-in visitors go straight on)."""
    if principal is not None:
        return RedirectResponse(_safe_next(next), 303)
    return _page(request, "sign_in.html", {"next": _safe_next(next), "error": None})


@router.post("/sign-in")
def sign_in(
    request: Request,
    session: SessionDep,
    api_key: Annotated[str, Form(max_length=500)],
    next: Annotated[str | None, Form(max_length=500)] = None,
) -> Response:
    """Check the API key, open a session and set its cookie (the key itself is not kept)."""
    origin = request.headers.get("origin")
    if origin and urlparse(origin).netloc != request.headers.get("host"):
        return _page(
            request, "sign_in.html", {"next": "/dashboards", "error": "Cross-site sign-in."}, 403
        )
    try:
        token, _ = service.sign_in(session, api_key=api_key)
    except Unauthorized:
        context = {"next": _safe_next(next), "error": "That key is not valid, or was revoked."}
        return _page(request, "sign_in.html", context, 401)
    response = RedirectResponse(_safe_next(next), 303)
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(service.SESSION_LIFETIME.total_seconds()),
        path="/dashboards",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/sign-out")
def sign_out(request: Request, session: SessionDep) -> Response:
    """Close the session and clear its cookie."""
    service.sign_out(session, token=session_token(request))
    response = RedirectResponse("/dashboards/sign-in", 303)
    response.delete_cookie(
        SESSION_COOKIE, path="/dashboards", secure=True, httponly=True, samesite="strict"
    )
    return response


@router.get("", response_class=HTMLResponse)
def overview(request: Request, session: SessionDep, principal: PagePrincipalDep) -> Response:
    """The standard dashboards and the saved custom ones."""
    if principal is None:
        return _to_sign_in(request)
    custom, total = service.list_dashboards(session, limit=100, offset=0)
    names = {m.name for m in catalogue().all()}
    cards = [
        {
            "dashboard": d,
            "live": sum(1 for w in d.widgets if w.metric in names),
            "planned": sum(1 for w in d.widgets if w.metric not in names),
        }
        for d in STANDARD
    ]
    return _page(
        request,
        "overview.html",
        {
            "principal": principal,
            "nav": STANDARD,
            "active": "overview",
            "cards": cards,
            "custom": custom,
            "custom_total": total,
        },
    )


@router.get("/custom/{dashboard_id}", response_class=HTMLResponse)
def custom_dashboard(
    request: Request,
    session: SessionDep,
    principal: PagePrincipalDep,
    dashboard_id: str,
    start: Annotated[date | None, Query(alias="from")] = None,
    end: Annotated[date | None, Query(alias="to")] = None,
    program_id: Annotated[str | None, Query(max_length=100)] = None,
    segment_a: Annotated[str | None, Query(max_length=100)] = None,
    segment_b: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """A saved custom dashboard, rendered like the standard ones."""
    if principal is None:
        return _to_sign_in(request)
    try:
        dashboard = service.get_dashboard(session, dashboard_id=dashboard_id)
    except DashboardNotFound:
        context = {"principal": principal, "nav": STANDARD, "active": ""}
        return _page(request, "not_found.html", context, 404)
    return _render(
        request,
        principal,
        slug="custom",
        title=dashboard.title,
        summary=dashboard.description,
        widgets=[Widget.model_validate(w) for w in dashboard.widgets],
        page_range=_page_range(start, end),
        program_selector=False,
        choices=_choices(session, program_id=program_id, segment_a=segment_a, segment_b=segment_b),
        planned=[],
    )


@router.get("/{slug}", response_class=HTMLResponse)
def standard_dashboard(
    request: Request,
    session: SessionDep,
    principal: PagePrincipalDep,
    slug: str,
    start: Annotated[date | None, Query(alias="from")] = None,
    end: Annotated[date | None, Query(alias="to")] = None,
    program_id: Annotated[str | None, Query(max_length=100)] = None,
    segment_a: Annotated[str | None, Query(max_length=100)] = None,
    segment_b: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    """A standard dashboard: data health, programme or audiences."""
    if principal is None:
        return _to_sign_in(request)
    dashboard = BY_SLUG.get(slug)
    if dashboard is None:
        context = {"principal": principal, "nav": STANDARD, "active": ""}
        return _page(request, "not_found.html", context, 404)
    _, still_planned = service.list_metrics()
    return _render(
        request,
        principal,
        slug=slug,
        title=dashboard.title,
        summary=dashboard.summary,
        widgets=dashboard.widgets,
        page_range=_page_range(start, end),
        program_selector=dashboard.program_selector,
        choices=_choices(session, program_id=program_id, segment_a=segment_a, segment_b=segment_b),
        planned=[p for p in still_planned if p.dashboard == slug],
    )


@api_router.get("/kpis/{metric}", response_model=KpiSeriesRead)
def page_kpi(
    metric: str, session: SessionDep, warehouse: WarehouseDep, params: KpiParamsDep
) -> KpiSeriesRead | Response:
    """The series behind a widget: what `GET /api/kpis/{metric}` answers, for the session."""
    return kpi_response(session, warehouse, metric, params)
