"""The platform error model: every domain error subclasses `CdpError`."""

from __future__ import annotations

from typing import Any, ClassVar


class CdpError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, details: Any = None) -> None:  # Any: free-form JSON
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(CdpError):
    """The request is malformed."""

    status_code = 400
    code = "bad_request"


class Unauthorized(CdpError):
    """No valid credentials."""

    status_code = 401
    code = "unauthorized"


class Forbidden(CdpError):
    """Valid credentials without the needed role."""

    status_code = 403
    code = "forbidden"


class NotFound(CdpError):
    """The resource does not exist."""

    status_code = 404
    code = "not_found"


class Conflict(CdpError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class PayloadTooLarge(CdpError):
    """The body is over the allowed size."""

    status_code = 413
    code = "payload_too_large"


class Invalid(CdpError):
    """The request is well formed but its content is not acceptable."""

    status_code = 422
    code = "invalid"


class TooManyRequests(CdpError):
    """The server is saturated; retry later."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int = 1, details: Any = None) -> None:
        super().__init__(message, details=details)  # Any: free-form JSON
        self.retry_after = retry_after


class Unavailable(CdpError):
    """A dependency (a store) is not available."""

    status_code = 503
    code = "unavailable"


class WarehouseLocked(CdpError):
    """Another process holds the warehouse file."""

    status_code = 503
    code = "warehouse_locked"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:  # Any: JSON
    """The JSON body of an error response."""
    error: dict[str, Any] = {"code": code, "message": message}  # Any: JSON
    if details is not None:
        error["details"] = details
    return {"error": error}
