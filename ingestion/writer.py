"""The group-commit writer: one thread makes everything the tracking API has queued durable.

Requests parse and validate their messages on the event loop, queue them here and await a
future. The writer thread takes whatever is queued, appends it to the spool as one record
(one write, one fsync), hands the record to the drainer and resolves every waiting future:
a request is answered only once its events are on disk. The drainer loads spooled records
into DuckDB in large batches. The backlog (queued plus spooled and not yet loaded) is
bounded, so a saturated server answers 429 instead of growing without limit.
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

from ingestion.drainer import Drainer
from ingestion.errors import QueueFull, WriterStopped
from ingestion.loader import (
    EVENT_SCHEMA,
    IDENTIFIER_SCHEMA,
    REJECTION_SCHEMA,
    LoadInput,
)
from ingestion.spool import Spool
from ingestion.tracking import Parsed

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Submission:
    """One request's messages waiting for the next spool write."""

    source_id: str
    parsed: Parsed
    received_at: datetime
    future: asyncio.Future[int]
    loop: asyncio.AbstractEventLoop

    @property
    def size(self) -> int:
        """Backlog weight: stored and rejected messages."""
        return self.parsed.accepted + len(self.parsed.rejections)


class GroupCommitWriter:
    """A single writer thread spooling queued submissions together."""

    def __init__(
        self, spool: Spool, drainer: Drainer, *, max_backlog: int, linger_s: float = 0.0
    ) -> None:
        self.spool = spool
        self.drainer = drainer
        self.max_backlog = max_backlog
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
        """Messages waiting for the spool (including those being written)."""
        return self._queued

    @property
    def backlog(self) -> int:
        """Messages accepted and not yet loaded into DuckDB."""
        return self._queued + self.drainer.backlog

    def start(self) -> None:
        """Start the writer thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cdp-ingest-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse new submissions, spool what is queued, and stop the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, source_id: str, parsed: Parsed, received_at: datetime) -> asyncio.Future[int]:
        """Queue a request's messages; the future resolves (to the spool lsn) once durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        item = Submission(source_id, parsed, received_at, future, loop)
        with self._cond:
            if self._stopping or self._thread is None:
                raise WriterStopped("the server is shutting down; retry shortly")
            backlog = self._queued + self.drainer.backlog
            if backlog and backlog + item.size > self.max_backlog:
                raise QueueFull(
                    "the ingestion backlog is full; retry after the delay in Retry-After",
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
            time.sleep(self.linger_s)  # gather a few more requests into this write
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
            self.in_flight = len(items)
        return items

    def _run(self) -> None:
        while True:
            items = self._take()
            if items is None:
                return
            size = sum(item.size for item in items)
            try:
                data = combine([(i.source_id, i.parsed, i.received_at) for i in items])
                lsn = self.spool.append(data)
            except Exception as exc:  # handed to every waiting request, which answers 500
                logger.exception("spool write failed", extra={"requests": len(items)})
                with self._cond:
                    self._queued -= size
                for item in items:
                    item.loop.call_soon_threadsafe(_fail, item.future, exc)
            else:
                # Durable now; counted in the drainer's backlog before leaving the queue's.
                self.drainer.add(lsn, data, size)
                with self._cond:
                    self._queued -= size
                self.commits += 1
                for item in items:
                    item.loop.call_soon_threadsafe(_resolve, item.future, lsn)
            self.in_flight = 0


def _resolve(future: asyncio.Future[int], value: int) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[int], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


def combine(items: list[tuple[str, Parsed, datetime]]) -> LoadInput:
    """One load from several requests (source id, messages, time received): their columns
    concatenated, rows renumbered."""
    columns: dict[str, list[object]] = {name: [] for name in EVENT_SCHEMA}
    identifiers: dict[str, list[object]] = {"_row": [], "kind": [], "value": []}
    rejections: dict[str, list[object]] = {name: [] for name in REJECTION_SCHEMA}
    dropped: dict[str, int] = {}
    offset = 0
    for source_id, parsed, received_at in items:
        n = parsed.accepted
        columns["_row"].extend(range(offset, offset + n))
        columns["source_id"].extend([source_id] * n)
        columns["received_at"].extend([received_at] * n)
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
            rejections["source_id"].append(source_id)
            rejections["position"].append(position)
            rejections["message_id"].append(message_id)
            rejections["reason"].append(reason)
        dropped[source_id] = dropped.get(source_id, 0) + parsed.dropped
        offset += n
    return LoadInput(
        channel="http",
        events=pl.DataFrame(columns, schema=EVENT_SCHEMA),
        identifiers=pl.DataFrame(identifiers, schema=IDENTIFIER_SCHEMA),
        rejections=pl.DataFrame(rejections, schema=REJECTION_SCHEMA),
        dropped=dropped,
    )
