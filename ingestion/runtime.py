"""Ingestion's runtime in the server: the tracking API (write-key cache, request handling,
writer, spool, drainer) and the background file imports."""

from __future__ import annotations

import gc
import logging
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from cdp.auth import hash_key
from cdp.config import Settings
from cdp.db import Database
from cdp.warehouse import Warehouse
from ingestion import service
from ingestion.background import ImportWorker
from ingestion.drainer import Drainer
from ingestion.errors import (
    BodyTooLarge,
    InvalidWriteKey,
    MalformedRequest,
    WriterStopped,
)
from ingestion.loader import loader_for
from ingestion.spool import Spool
from ingestion.tracking import (
    MAX_MESSAGE_BYTES,
    MalformedMessage,
    Parsed,
    SourceInfo,
    messages_of,
    parse_body,
    parse_messages,
    write_key_from_header,
)
from ingestion.writer import GroupCommitWriter

logger = logging.getLogger(__name__)

_OK = orjson.dumps({"success": True})


class TrackingRuntime:
    """Everything the `/v1/*` routes and uploads need, created in the app's lifespan."""

    def __init__(self, settings: Settings, db: Database, warehouse: Warehouse) -> None:
        self.settings = settings
        self.db = db
        self.limits = settings.ingestion
        self.spool = Spool(spool_dir(settings), segment_bytes=self.limits.spool_segment_bytes)
        self.drainer = Drainer(
            loader_for(warehouse),
            self.spool,
            interval_s=self.limits.drain_interval_ms / 1000,
            max_events=self.limits.drain_max_events,
        )
        self.writer = GroupCommitWriter(
            self.spool,
            self.drainer,
            max_backlog=self.limits.queue_max_events,
            linger_s=self.limits.writer_linger_ms / 1000,
        )
        self.imports = ImportWorker(db, warehouse, region=settings.default_phone_region)
        self._keys: dict[str, tuple[SourceInfo | None, float, int]] = {}

    def start(self) -> None:
        """Load what the spool holds from before (a crash), then start the threads."""
        self.drainer.replay()
        # Everything alive now (app, libraries, caches) lives as long as the server: keep it
        # out of the cyclic collector, whose full passes otherwise rescan it while requests
        # allocate thousands of message dicts each.
        gc.freeze()
        self.drainer.start()
        self.writer.start()
        self.imports.start()

    def stop(self) -> None:
        """Stop background imports (after their current chunk), spool what is queued, load
        everything spooled, and stop the threads."""
        self.imports.stop()
        self.writer.stop()
        self.drainer.stop()
        self.spool.close(self.drainer.drained_lsn)

    def wait_drained(self, *, timeout: float = 60.0) -> bool:
        """Wait until every acknowledged event so far is loaded into the warehouse."""
        return self.drainer.wait_drained(timeout=timeout)

    def _lookup(self, write_key: str) -> SourceInfo | None:
        with self.db.begin() as session:
            return service.find_source_by_write_key(session, write_key=write_key)

    async def source_for(self, write_key: str) -> SourceInfo:
        """The enabled `http` source of a write key, or InvalidWriteKey."""
        digest = hash_key(write_key)
        now = time.monotonic()
        hit = self._keys.get(digest)
        if hit is not None and hit[1] > now and hit[2] == service.generation():
            info = hit[0]
        else:
            generation = service.generation()
            info = await run_in_threadpool(self._lookup, write_key)
            if len(self._keys) > 10_000:
                self._keys.clear()
            self._keys[digest] = (info, now + self.limits.key_cache_seconds, generation)
        if info is None or not info.enabled:
            raise InvalidWriteKey("unknown or disabled write key")
        return info

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if request.headers.get("content-encoding", "").lower() == "gzip":
            inflater = zlib.decompressobj(wbits=31)
            try:
                raw = inflater.decompress(raw, limit + 1)
            except zlib.error:
                raise MalformedRequest("body is not valid gzip") from None
            if len(raw) > limit or inflater.unconsumed_tail:
                raise BodyTooLarge(f"decompressed request body over {limit} bytes")
        return raw

    async def handle(self, request: Request, endpoint: str) -> Response:
        """Answer one tracking request, after its messages are committed."""
        received_at = datetime.now(UTC).replace(tzinfo=None)
        raw = await self._body(request)
        header_key = write_key_from_header(request.headers.get("authorization"))
        try:
            body = parse_body(raw)
        except MalformedMessage as exc:
            if header_key:
                source = await self.source_for(header_key)
                await self._commit(source, _rejected(str(exc)), received_at)
            raise MalformedRequest(str(exc)) from None
        body_key = body.get("writeKey")
        write_key = header_key or (body_key if isinstance(body_key, str) else None)
        if not write_key:
            raise InvalidWriteKey("missing write key: send it as the basic-auth username")
        source = await self.source_for(write_key)
        try:
            messages = messages_of(body, endpoint)
        except MalformedMessage as exc:
            await self._commit(source, _rejected(str(exc)), received_at)
            raise MalformedRequest(str(exc)) from None
        parsed = parse_messages(
            body,
            messages,
            source=source,
            received_at=received_at,
            region=self.settings.default_phone_region,
            check_sizes=len(raw) > MAX_MESSAGE_BYTES,
        )
        await self._commit(source, parsed, received_at)
        if endpoint != "batch" and parsed.rejections:
            raise MalformedRequest(parsed.rejections[0][2])
        if not parsed.rejections:
            return Response(_OK, media_type="application/json")
        rejected: list[dict[str, Any]] = [  # Any: JSON
            {"index": index, "messageId": message_id, "reason": reason}
            for index, message_id, reason in parsed.rejections
        ]
        return Response(
            orjson.dumps({"success": True, "rejected": rejected}), media_type="application/json"
        )

    async def _commit(self, source: SourceInfo, parsed: Parsed, received_at: datetime) -> None:
        await self.writer.submit(source.id, parsed, received_at)


def spool_dir(settings: Settings) -> Path:
    """Where the tracking spool lives: the setting, or beside the warehouse file."""
    configured = settings.ingestion.spool_dir
    if configured is not None:
        return configured
    warehouse = settings.warehouse_file
    return warehouse.with_name(warehouse.name + ".spool")


def _rejected(reason: str) -> Parsed:
    parsed = Parsed()
    parsed.rejections.append((None, None, reason))
    return parsed


def get_runtime(request: Request) -> TrackingRuntime:
    """The tracking runtime of the running app."""
    runtime: TrackingRuntime | None = getattr(request.app.state, "ingestion", None)
    if runtime is None:
        raise WriterStopped("the tracking API is not running")
    return runtime


@contextmanager
def lifecycle(app: FastAPI) -> Iterator[None]:
    """Start the tracking runtime with the app (replaying the spool); on shutdown load
    everything acknowledged before the warehouse closes."""
    runtime = TrackingRuntime(app.state.settings, app.state.db, app.state.warehouse)
    runtime.start()
    app.state.ingestion = runtime
    try:
        yield
    finally:
        runtime.stop()
        app.state.ingestion = None
