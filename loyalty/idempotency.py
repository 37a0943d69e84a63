"""`Idempotency-Key` for write endpoints: a retry with the same key replays the first result.

The first request with a key inserts a record `(scope, key)` under a unique constraint with
`ON CONFLICT DO NOTHING`, runs, and stores its response in the same transaction. A request
that finds the record replays the stored response, or gets 409 when its body differs. Two
concurrent requests with one key: the second's insert waits for the first transaction
(PostgreSQL's unique index; SQLite's write lock), then finds the committed record. A request
that fails rolls its record back, so a retry runs again.

Write routes return the serialised `Response` built here rather than a model: FastAPI
validates and serialises a returned model in a worker thread *before* the request's session
commits, so a request holding a database lock (SQLite's write lock, a PostgreSQL row lock)
would wait for a free worker while every worker waits for its lock. Serialising inside the
route keeps the lock's span inside one worker call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, Header, Request, Response
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loyalty.errors import IdempotencyKeyRequired, IdempotencyKeyReused
from loyalty.ledger import insert_ignoring_conflicts
from loyalty.models import IdempotencyRecord

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Idempotency:
    """The key of a write request (None when the client sent none) and its scope."""

    key: str | None
    scope: str


def request_idempotency(
    request: Request,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Retrying with the same key returns the first result",
        ),
    ] = None,
) -> Idempotency:
    """Read the `Idempotency-Key` header; keys are scoped to the API key and the path."""
    principal = getattr(request.state, "principal", None)
    who = principal.key_id if principal is not None else "-"
    return Idempotency(key=key, scope=f"{who}:{request.method} {request.url.path}")


IdempotencyDep = Annotated[Idempotency, Depends(request_idempotency)]


def require_key(idem: Idempotency) -> str:
    """The request's key, or IdempotencyKeyRequired."""
    if idem.key is None:
        raise IdempotencyKeyRequired("send an Idempotency-Key header with this request")
    return idem.key


def fingerprint(body: Any) -> str:  # Any: JSON-ready request data
    """A stable hash of a request body."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def run_once(
    session: Session,
    *,
    idem: Idempotency,
    body: Any,  # Any: JSON-ready request data
    model: type[M],
    run: Callable[[], M],
    status_code: int = 200,
) -> Response:
    """Run a write once per key: the first call runs `run`, later ones replay its response."""
    if idem.key is None:
        return _json(run().model_dump_json(), status_code)
    digest = fingerprint(body)
    inserted = session.execute(
        insert_ignoring_conflicts(session, IdempotencyRecord.__table__).returning(
            IdempotencyRecord.__table__.c.id
        ),
        [{"id": _record_id(idem), "scope": idem.scope, "key": idem.key, "request_hash": digest}],
    ).first()
    if inserted is None:
        record = session.scalar(
            select(IdempotencyRecord).where(
                IdempotencyRecord.scope == idem.scope, IdempotencyRecord.key == idem.key
            )
        )
        assert record is not None
        assert record.response is not None
        if record.request_hash != digest:
            raise IdempotencyKeyReused(
                "this Idempotency-Key was used with a different request",
                details={"key": idem.key},
            )
        return _json(model.model_validate_json(record.response).model_dump_json(), status_code)
    body_json = run().model_dump_json()
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.id == inserted[0])
        .values(response=body_json)
    )
    return _json(body_json, status_code)


def _json(body: str, status_code: int) -> Response:
    return Response(content=body, status_code=status_code, media_type="application/json")


def _record_id(idem: Idempotency) -> str:
    return hashlib.sha256(f"{idem.scope}\x00{idem.key}".encode()).hexdigest()[:36]
