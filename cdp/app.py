"""The FastAPI application factory: the composition root that wires every package together."""

from __future__ import annotations

import gc
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import cdp
from cdp import auth, scheduler
from cdp.config import Settings, get_settings
from cdp.db import Database
from cdp.errors import CdpError, TooManyRequests, error_body
from cdp.logs import configure_logging, request_id_var
from cdp.scheduler import FOUNDATION_JOBS, JobRunner, JobSpec, Scheduler
from cdp.warehouse import Warehouse
from dashboards import jobs as dashboards_jobs
from dashboards.router import router as dashboards_router
from identity import jobs as identity_jobs
from identity import service as identity_service
from identity.router import router as identity_router
from ingestion import jobs as ingestion_jobs
from ingestion.router import router as ingestion_router
from ingestion.runtime import lifecycle as ingestion_lifecycle
from loyalty import jobs as loyalty_jobs
from loyalty import service as loyalty_service
from loyalty.router import router as loyalty_router
from segments import jobs as segments_jobs
from segments import service as segments_service
from segments.router import router as segments_router

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
}


class RequestContextMiddleware:
    """Gives every request an id (kept from `X-Request-ID` when safe), echoes it, logs access."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.lower().encode())
        candidate = incoming.decode("latin-1") if incoming else ""
        request_id = candidate if _SAFE_REQUEST_ID.match(candidate) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.lower() != REQUEST_ID_HEADER.lower().encode()
                ]
                headers.append((REQUEST_ID_HEADER.lower().encode(), request_id.encode()))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logger.info(
                "request",
                extra={
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            request_id_var.reset(token)


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)


def _error_response(
    request: Request, status: int, code: str, message: str, details: Any = None
) -> JSONResponse:  # Any: JSON
    response = JSONResponse(error_body(code, message, details), status_code=status)
    response.headers[REQUEST_ID_HEADER] = _request_id(request)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, ours or the framework's, in the platform's JSON error model."""

    @app.exception_handler(CdpError)
    async def cdp_error(request: Request, exc: CdpError) -> JSONResponse:
        response = _error_response(request, exc.status_code, exc.code, exc.message, exc.details)
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")}
            for err in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _error_response(
            request,
            422,
            "validation_error",
            f"{where}: {first['msg']}" if where else str(first["msg"]),
            jsonable_encoder(details),
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        response = _error_response(request, exc.status_code, code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        request_id = _request_id(request)
        logger.error(
            "unhandled error",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"request_id": request_id, "path": request.url.path},
        )
        return _error_response(
            request,
            500,
            "internal",
            f"internal error; quote request id {request_id} when reporting it",
        )


def _segment_attributes(warehouse: Warehouse, profile_id: str) -> dict[str, Any] | None:
    """Segments' computed attributes of a profile, for identity's profile API."""
    return segments_service.profile_attributes(warehouse, profile_id=profile_id)


def wire_packages() -> None:
    """Register what a lower layer needs from a higher one (see ARCHITECTURE.md).

    Identity's profile API shows segments' computed attributes, and its privacy export
    what loyalty and segments hold about the person; loyalty's segment fields register when
    `loyalty.service` is imported (and again here, idempotently).
    """
    identity_service.register_attributes_provider(_segment_attributes)
    identity_service.register_export_section("loyalty", loyalty_service.person_export)
    identity_service.register_export_section("segments", segments_service.person_export)
    loyalty_service.register_segment_fields()


def registered_jobs() -> tuple[JobSpec, ...]:
    """Every job of every package, as the scheduler and the CLI see them."""
    return (
        *FOUNDATION_JOBS,
        *ingestion_jobs.JOBS,
        *identity_jobs.JOBS,
        *segments_jobs.JOBS,
        *loyalty_jobs.JOBS,
        *dashboards_jobs.JOBS,
    )


# Context managers entered when the app starts and exited (in reverse) when it stops, before
# the stores close: e.g. the tracking API's writer thread, which commits what is queued.
LIFECYCLE_HOOKS: tuple[Callable[[FastAPI], AbstractContextManager[None]], ...] = (
    ingestion_lifecycle,
)


def server_options(settings: Settings) -> dict[str, Any]:  # Any: uvicorn's arguments
    """What `cdp serve` and `cdp demo` give uvicorn: where to listen, our own logging, and
    idle keep-alive connections kept longer than the clients keep theirs."""
    return {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "timeout_keep_alive": settings.keep_alive_seconds,
    }


def freeze_startup_objects() -> None:
    """Take every object alive now (modules, the app, its routes and models) out of the
    cyclic collector's full collections, once a server process has built its app.

    A full collection walks every tracked object and stops every thread meanwhile; in the
    server that is about 150,000 objects that live as long as the process. A read that
    builds many rows triggers dozens of full collections (the 1M-member snapshot: 51), and
    they paused the real-time job each time (0.11 s each; 0.04 s at most once frozen).
    Garbage is collected first, so nothing collectable is kept. Only for a serving
    process: tests that build many apps would keep every frozen one."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    db: Database | None = None,
    warehouse: Warehouse | None = None,
    start_scheduler: bool | None = None,
) -> FastAPI:
    """Build the platform app: both stores, every package's router, jobs and error handling."""
    settings = settings or get_settings()
    db = db or Database.from_settings(settings)
    warehouse = warehouse or Warehouse(
        settings.warehouse_file,
        memory_limit=settings.duckdb_memory_limit,
        threads=settings.duckdb_threads,
        holder=f"cdp server (http://{settings.host}:{settings.port})",
    )
    warehouse.open()
    wire_packages()
    runner = JobRunner(settings, db, warehouse)
    runner.register(*registered_jobs())
    use_scheduler = settings.scheduler.enabled if start_scheduler is None else start_scheduler
    job_scheduler = Scheduler(runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        hooks = ExitStack()
        try:
            for hook in LIFECYCLE_HOOKS:
                hooks.enter_context(hook(app))
            if use_scheduler:
                job_scheduler.start()
            yield
        finally:
            job_scheduler.shutdown()
            hooks.close()
            runner.shutdown()
            auth.key_uses(db).flush(timeout=5.0)
            warehouse.close()
            db.dispose()

    app = FastAPI(
        title="CDP",
        version=cdp.__version__,
        summary="Customer Data Platform with an integrated loyalty engine",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.db = db
    app.state.warehouse = warehouse
    app.state.runner = runner
    app.state.scheduler = job_scheduler
    app.add_middleware(RequestContextMiddleware)
    install_error_handlers(app)

    @app.get("/", tags=["health"])
    def index() -> dict[str, str]:
        """Where to go next."""
        return {"name": "cdp", "version": cdp.__version__, "docs": "/docs", "health": "/healthz"}

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        """Readiness: both stores answer a query."""
        checks: dict[str, str] = {}
        for name, ping in (("operational", db.ping), ("warehouse", warehouse.ping)):
            try:
                ping()
                checks[name] = "ok"
            except Exception as exc:  # reported in the body; readiness must not raise
                logger.warning("readiness check failed", extra={"store": name, "error": str(exc)})
                checks[name] = "unavailable"
        ready = all(v == "ok" for v in checks.values())
        body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
        if not ready:
            body["error"] = {"code": "unavailable", "message": "a store is not available"}
        return JSONResponse(body, status_code=200 if ready else 503)

    app.include_router(auth.router)
    app.include_router(scheduler.router)
    for router in (
        ingestion_router,
        identity_router,
        segments_router,
        loyalty_router,
        dashboards_router,
    ):
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """The app configured from the environment (for `uvicorn --factory cdp.app:app_from_env`)."""
    settings = get_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    return create_app(settings)
