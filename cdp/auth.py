"""API keys and roles: keys are stored hashed, shown once, and checked per route."""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ForeignKey, String, func, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from cdp.db import Base, SessionDep, UtcDateTime, get_db, new_id, utcnow
from cdp.errors import Forbidden, NotFound, Unauthorized
from cdp.pagination import Page, PageDep

logger = logging.getLogger(__name__)

KEY_PREFIX = "cdp_"
# last_used_at is refreshed at most this often, so reads do not turn into writes.
TOUCH_INTERVAL = timedelta(seconds=60)


class Role(StrEnum):
    """What an API key may do. `admin` may do everything."""

    admin = "admin"
    data = "data"
    marketer = "marketer"
    loyalty = "loyalty"
    viewer = "viewer"


class ApiKey(Base):
    """A management API key; only the SHA-256 of the secret is stored."""

    __tablename__ = "cdp_api_key"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(
        String(36), ForeignKey("cdp_api_key.id", ondelete="SET NULL")
    )
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


def hash_key(key: str) -> str:
    """The stored form of a key: keys are 256-bit random, so a plain SHA-256 is enough."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, *, name: str, role: Role, created_by: str | None = None
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the clear key, which is never stored or shown again."""
    prefix = secrets.token_hex(4)
    clear = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=new_id(),
        name=name,
        role=role.value,
        prefix=prefix,
        key_hash=hash_key(clear),
        created_at=utcnow(),
        created_by=created_by,
    )
    session.add(key)
    session.flush()
    logger.info("api key created", extra={"key_id": key.id, "role": role.value})
    return key, clear


def list_keys(session: Session, *, limit: int, offset: int) -> tuple[list[ApiKey], int]:
    """Keys, newest first, with the total count."""
    total = session.scalar(select(func.count()).select_from(ApiKey)) or 0
    rows = session.scalars(
        select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def get_key(session: Session, *, key_id: str) -> ApiKey:
    """The key with this id, or NotFound."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"API key {key_id} does not exist")
    return key


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    """Revoke a key; revoking twice keeps the first revocation time."""
    key = get_key(session, key_id=key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        logger.info("api key revoked", extra={"key_id": key.id})
    return key


def authenticate(session: Session, *, clear: str) -> ApiKey:
    """The active key matching a clear key, or Unauthorized."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(clear)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > TOUCH_INTERVAL:
        key.last_used_at = now
    return key


_bearer = HTTPBearer(auto_error=False, description="A management API key")


class Principal(BaseModel):
    """Who is calling: the key's id, name and role."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    name: str
    role: Role


class RequireRole:
    """Route dependency that admits keys of the given roles (and always `admin`)."""

    def __init__(self, *roles: Role) -> None:
        self.roles = frozenset({Role.admin, *roles})

    def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        """Check the bearer key and its role."""
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        # A route guarded twice (router and route) checks the key once.
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is None:
            # In a transaction of its own, not the request's: FastAPI runs this dependency
            # and the endpoint in two worker threads, and a pooled connection held between
            # the two (the request's session) waits for a thread while every thread may be
            # waiting for a connection. Under a burst (or clients giving up) the server then
            # stopped answering for good. The key's last-use touch commits here too, so
            # SQLite's write lock is not held for the rest of the request.
            with get_db(request).begin() as session:
                key = authenticate(session, clear=credentials.credentials)
                principal = Principal(key_id=key.id, name=key.name, role=Role(key.role))
            request.state.principal = principal
        if principal.role not in self.roles:
            allowed = ", ".join(sorted(r.value for r in self.roles))
            raise Forbidden(
                f"this route needs one of the roles: {allowed}; the key is {principal.role}"
            )
        return principal


def require(*roles: Role) -> RequireRole:
    """The dependency for a router or route restricted to these roles."""
    return RequireRole(*roles)


# Read access for everybody with a key.
ANY_ROLE = tuple(Role)

ADMIN = require(Role.admin)
AdminDep = Annotated[Principal, Depends(ADMIN)]


class ApiKeyCreate(BaseModel):
    """Body of a key creation."""

    name: str = Field(min_length=1, max_length=200)
    role: Role


class ApiKeyRead(BaseModel):
    """A key as listed: never its secret."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    role: Role
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """A key just created: the only time its secret is shown."""

    key: str


router = APIRouter(prefix="/api/keys", tags=["auth"], dependencies=[Depends(ADMIN)])


@router.post("", status_code=201)
def create_api_key(body: ApiKeyCreate, session: SessionDep, principal: AdminDep) -> ApiKeyCreated:
    """Create an API key; the response is the only time the key is shown."""
    key, clear = create_key(session, name=body.name, role=body.role, created_by=principal.key_id)
    return ApiKeyCreated(**ApiKeyRead.model_validate(key).model_dump(), key=clear)


@router.get("")
def list_api_keys(session: SessionDep, page: PageDep) -> Page[ApiKeyRead]:
    """List API keys, newest first."""
    rows, total = list_keys(session, limit=page.limit, offset=page.offset)
    return Page[ApiKeyRead].of(
        [ApiKeyRead.model_validate(r) for r in rows], total=total, params=page
    )


@router.delete("/{key_id}")
def revoke_api_key(key_id: str, session: SessionDep) -> ApiKeyRead:
    """Revoke an API key: it is refused from the next request on."""
    return ApiKeyRead.model_validate(revoke_key(session, key_id=key_id))
