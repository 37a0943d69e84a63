"""The group-commit writer: one thread commits everything the tracking API has queued.

Requests parse and validate their messages on the event loop, queue them here and await a
future. The writer thread takes whatever is queued, commits it in one DuckDB transaction
through the loader, then resolves every waiting future; a request is answered only after
its events are durable. The queue is bounded by events, so a saturated server answers 429
instead of growing without limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

import polars as pl

from ingestion.errors import QueueFull, WriterStopped
from ingestion.loader import (
    EVENT_SCHEMA,
    IDENTIFIER_SCHEMA,
    REJECTION_SCHEMA,
    LoadedBatch,
    Loader,
    LoadInput,
)
from ingestion.tracking import Parsed

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Submission:
    """One request's messages waiting for the next commit."""

    source_id: str
    parsed: Parsed
    received_at: datetime
    future: asyncio.Future[LoadedBatch | None]
    loop: asyncio.AbstractEventLoop

    @property
    def size(self) -> int:
        """Queue weight: stored and rejected messages."""
        return self.parsed.accepted + len(self.parsed.rejections)


class GroupCommitWriter:
    """A single writer thread committing queued submissions together."""

    def __init__(self, loader: Loader, *, max_queued: int, linger_s: float = 0.0) -> None:
        self.loader = loader
        self.max_queued = max_queued
        self.linger_s = linger_s
        self._queue: deque[Submission] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.commits = 0
        # Requests taken by the writer and not yet resolved.
        self.in_flight = 0

    @property
    def queued(self) -> int:
        """Messages waiting for the next commit."""
        return self._queued

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cdp-ingest-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new submissions, commit what is queued, and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(
        self, source_id: str, parsed: Parsed, received_at: datetime
    ) -> asyncio.Future[LoadedBatch | None]:
        """Queue a request's messages; the future resolves once they are committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[LoadedBatch | None] = loop.create_future()
        item = Submission(source_id, parsed, received_at, future, loop)
        with self._cond:
            if self._stopping or self._thread is None:
                raise WriterStopped("the server is shutting down; retry shortly")
            if self._queued and self._queued + item.size > self.max_queued:
                raise QueueFull(
                    "the ingestion queue is full; retry after the delay in Retry-After",
                    retry_after=1,
                )
            self._queue.append(item)
            self._queued += item.size
            self._cond.notify()
        return future

    def _take(self) -> list[Submission] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
        if self.linger_s:
            time.sleep(self.linger_s)  # gather a few more requests into this commit
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            self._queued = 0
            self.in_flight = len(items)
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            try:
                batches = self.loader.load(combine(items))
            except Exception as exc:  # handed to every waiting request, which answers 500
                logger.exception("group commit failed", extra={"requests": len(items)})
                for item in items:
                    item.loop.call_soon_threadsafe(_fail, item.future, exc)
            else:
                self.commits += 1
                for item in items:
                    item.loop.call_soon_threadsafe(
                        _resolve, item.future, batches.get(item.source_id)
                    )
            self.in_flight = 0


def _resolve(future: asyncio.Future[LoadedBatch | None], value: LoadedBatch | None) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[LoadedBatch | None], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


def combine(items: list[Submission]) -> LoadInput:
    """One load from several requests: their columns concatenated, rows renumbered."""
    columns: dict[str, list[object]] = {name: [] for name in EVENT_SCHEMA}
    identifiers: dict[str, list[object]] = {"_row": [], "kind": [], "value": []}
    rejections: dict[str, list[object]] = {name: [] for name in REJECTION_SCHEMA}
    dropped: dict[str, int] = {}
    offset = 0
    for item in items:
        parsed = item.parsed
        n = parsed.accepted
        columns["_row"].extend(range(offset, offset + n))
        columns["source_id"].extend([item.source_id] * n)
        columns["received_at"].extend([item.received_at] * n)
        for name in (
            "message_id",
            "type",
            "event",
            "user_id",
            "anonymous_id",
            "timestamp",
            "properties",
            "traits",
            "context",
            "sent_at",
            "original_timestamp",
            "previous_id",
            "group_id",
        ):
            columns[name].extend(getattr(parsed, name))
        for row, kind, value in parsed.identifiers:
            identifiers["_row"].append(row + offset)
            identifiers["kind"].append(kind)
            identifiers["value"].append(value)
        for position, message_id, reason in parsed.rejections:
            rejections["source_id"].append(item.source_id)
            rejections["position"].append(position)
            rejections["message_id"].append(message_id)
            rejections["reason"].append(reason)
        dropped[item.source_id] = dropped.get(item.source_id, 0) + parsed.dropped
        offset += n
    return LoadInput(
        channel="http",
        events=pl.DataFrame(columns, schema=EVENT_SCHEMA),
        identifiers=pl.DataFrame(identifiers, schema=IDENTIFIER_SCHEMA),
        rejections=pl.DataFrame(rejections, schema=REJECTION_SCHEMA),
        dropped=dropped,
    )
