"""Every error is JSON in one shape, carries a request id, and never leaks a stack trace."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from cdp.auth import ApiKey, hash_key
from cdp.db import SessionDep, utcnow
from cdp.errors import Conflict, TooManyRequests
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


class Thing(BaseModel):
    """A body for the validation test."""

    count: int


@pytest.fixture
def app_with_test_routes(app: FastAPI) -> FastAPI:
    """The real app plus routes that fail in each way an app can fail."""

    @app.get("/boom")
    def boom() -> dict[str, str]:
        raise RuntimeError("secret internal detail")

    @app.get("/conflict")
    def conflict() -> dict[str, str]:
        raise Conflict("it clashes", details={"with": "x"})

    @app.get("/busy")
    def busy() -> dict[str, str]:
        raise TooManyRequests("slow down", retry_after=3)

    @app.post("/things")
    def things(body: Thing) -> Thing:
        return body

    @app.post("/commit-fails")
    def commit_fails(session: SessionDep) -> dict[str, str]:
        # Two rows with the same unique hash: the error only shows when the session commits.
        for name in ("a", "b"):
            session.add(
                ApiKey(
                    name=name,
                    role="admin",
                    prefix="p",
                    key_hash=hash_key("same"),
                    created_at=utcnow(),
                )
            )
        return {"status": "looks fine"}

    return app


@pytest.fixture
def test_client(app_with_test_routes: FastAPI) -> TestClient:
    """A client that turns server exceptions into 500 responses like a real server."""
    return TestClient(app_with_test_routes, raise_server_exceptions=False)


def test_unknown_route_is_json_404_with_request_id(test_client: TestClient) -> None:
    resp = test_client.get("/nowhere")
    assert resp.status_code == 404
    assert resp.json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert resp.headers["X-Request-ID"]


def test_wrong_method_is_json_405(test_client: TestClient) -> None:
    resp = test_client.delete("/healthz")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"


def test_validation_error_names_the_field(test_client: TestClient) -> None:
    resp = test_client.post("/things", json={"count": "many"})
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "validation_error"
    assert "count" in error["message"]
    assert error["details"][0]["loc"] == ["body", "count"]


def test_malformed_json_is_a_clear_error(test_client: TestClient) -> None:
    resp = test_client.post(
        "/things", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"


def test_domain_error_has_code_message_and_details(test_client: TestClient) -> None:
    resp = test_client.get("/conflict")
    assert resp.status_code == 409
    assert resp.json() == {
        "error": {"code": "conflict", "message": "it clashes", "details": {"with": "x"}}
    }


def test_saturation_error_sets_retry_after(test_client: TestClient) -> None:
    resp = test_client.get("/busy")
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "3"


def test_unhandled_error_is_500_without_trace_but_logged_with_request_id(
    test_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        resp = test_client.get("/boom", headers={"X-Request-ID": "req-123"})
    assert resp.status_code == 500
    body = resp.json()
    assert body["error"]["code"] == "internal"
    assert "req-123" in body["error"]["message"]
    assert "secret internal detail" not in resp.text
    assert "Traceback" not in resp.text
    assert resp.headers["X-Request-ID"] == "req-123"
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged
    assert getattr(logged[0], "request_id", None) == "req-123"
    assert logged[0].exc_info is not None


def test_failed_commit_returns_500(test_client: TestClient) -> None:
    resp = test_client.post("/commit-fails")
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal"


def test_unsafe_request_id_is_replaced(test_client: TestClient) -> None:
    resp = test_client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert resp.headers["X-Request-ID"] != "bad id\twith spaces"
    assert len(resp.headers["X-Request-ID"]) == 32


def test_health_and_readiness(test_client: TestClient) -> None:
    assert test_client.get("/healthz").json() == {"status": "ok"}
    ready = test_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"operational": "ok", "warehouse": "ok"}


def test_readiness_fails_when_a_store_is_down(app_with_test_routes: FastAPI) -> None:
    app_with_test_routes.state.warehouse.close()
    resp = TestClient(app_with_test_routes).get("/readyz")
    assert resp.status_code == 503
    assert resp.json()["checks"]["warehouse"] == "unavailable"
    assert resp.json()["error"]["code"] == "unavailable"
