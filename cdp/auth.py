"""API keys and roles: keys are stored hashed, shown once, and checked per route."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ForeignKey, String, func, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from cdp.db import Base, Database, SessionDep, UtcDateTime, get_db, new_id, utcnow
from cdp.errors import Forbidden, NotFound, Unauthorized
from cdp.pagination import Page, PageDep
from cdp.registry import PerObject

logger = logging.getLogger(__name__)

KEY_PREFIX = "cdp_"
# last_used_at is refreshed at most this often, by a background writer (`KeyUses`), so a
# request never writes for it.
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
    """The active key matching a clear key, or Unauthorized. Reads only: the key's last use
    is recorded by `KeyUses`."""
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(clear)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return key


class KeyUses:
    """Records when API keys were last used, without making any request write.

    The key check used to set `last_used_at` in its own transaction once a minute per key.
    Under load, every request that read the stale value before the first touch committed
    tried the same UPDATE, and each waited for SQLite's write lock behind the real-time
    loyalty job's transactions (up to the 30 s busy timeout), while their polling took the
    lock from the job between its transactions: at 1,000 events/s on a 1M-member programme
    the job fell behind for good. Now a request only notes the use in memory; one
    background thread per store writes the noted uses (each key at most every
    `TOUCH_INTERVAL`), and exits when there is nothing left to write.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Condition()
        self._pending: dict[str, datetime] = {}
        self._known: dict[str, datetime] = {}  # the latest use noted or written, per key
        self._writing = False

    def note(self, key: ApiKey, at: datetime | None = None) -> None:
        """Record that `key` (as just read from the store) was used at `at` (now)."""
        at = at or utcnow()
        with self._lock:
            last = max(
                (t for t in (key.last_used_at, self._known.get(key.id)) if t is not None),
                default=None,
            )
            if last is not None and at - last <= TOUCH_INTERVAL:
                return
            self._known[key.id] = self._pending[key.id] = at
            if not self._writing:
                self._writing = True
                threading.Thread(target=self._write, name="cdp-key-uses", daemon=True).start()

    def last_use(self, key: ApiKey) -> datetime | None:
        """The key's last use: the stored one, or a later one noted and not written yet."""
        with self._lock:
            noted = self._known.get(key.id)
        stored = key.last_used_at
        return noted if stored is None or (noted is not None and noted > stored) else stored

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every noted use is written; False if `timeout` passed first."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._writing, timeout)

    def _write(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, {}
                if not batch:
                    self._writing = False
                    self._lock.notify_all()
                    return
            try:
                with self._db.begin() as session:
                    for key_id, at in sorted(batch.items()):
                        session.execute(
                            update(ApiKey)
                            .where(
                                ApiKey.id == key_id,
                                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < at),
                            )
                            .values(last_used_at=at)
                        )
            except Exception:  # informational: a failed write must not stop the writer
                logger.warning("could not record API key uses", exc_info=True)


# The last-use recorder of a store (one per `Database` object).
key_uses: PerObject[Database, KeyUses] = PerObject(KeyUses)


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
            # stopped answering for good. It only reads: the key's last use is written in
            # the background (`KeyUses`).
            db = get_db(request)
            with db.begin() as session:
                key = authenticate(session, clear=credentials.credentials)
                principal = Principal(key_id=key.id, name=key.name, role=Role(key.role))
            key_uses(db).note(key)
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
def list_api_keys(request: Request, session: SessionDep, page: PageDep) -> Page[ApiKeyRead]:
    """List API keys, newest first (with uses noted and not written yet)."""
    rows, total = list_keys(session, limit=page.limit, offset=page.offset)
    uses = key_uses(get_db(request))
    return Page[ApiKeyRead].of(
        [
            ApiKeyRead.model_validate(r).model_copy(update={"last_used_at": uses.last_use(r)})
            for r in rows
        ],
        total=total,
        params=page,
    )


@router.delete("/{key_id}")
def revoke_api_key(key_id: str, session: SessionDep) -> ApiKeyRead:
    """Revoke an API key: it is refused from the next request on."""
    return ApiKeyRead.model_validate(revoke_key(session, key_id=key_id))
