"""The drainer: loads spooled tracking records into DuckDB in large batches.

The group-commit writer hands every record it made durable to the drainer (in memory: the
spool file is read back only on start). A thread takes what is pending, at most every
`interval_s` unless someone waits for it, up to `max_events` messages per load, and loads
it through the shared loader in one transaction that also stores the spool mark. Only then
are the record's segments deleted. Dedupe, event ids, identifiers and per-source counters
(duplicates included) are the loader's, as for every other path.

If a load fails, its records stay pending and are retried; the backlog grows until the
writer answers 429. Records never leave the spool before their load committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from ingestion.loader import Loader, LoadInput, concat_loads
from ingestion.spool import Spool

logger = logging.getLogger(__name__)

RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Pending:
    """A spooled record not yet loaded."""

    lsn: int
    data: LoadInput
    size: int


def _size(data: LoadInput) -> int:
    return data.events.height + data.rejections.height


class Drainer:
    """One thread moving spooled records into the warehouse."""

    def __init__(self, loader: Loader, spool: Spool, *, interval_s: float, max_events: int) -> None:
        self.loader = loader
        self.spool = spool
        self.interval_s = interval_s
        self.max_events = max_events
        self._pending: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._waiters = 0
        self._thread: threading.Thread | None = None
        self.backlog = 0
        self.drained_lsn = 0
        self.loads = 0
        self.failures = 0

    def replay(self) -> int:
        """Open the spool and load every record not yet in the warehouse; returns messages.

        Run before the server answers, and before `start`.
        """
        mark = self.loader.spool_mark()
        self.drained_lsn = mark
        replayed = 0
        batch: list[Pending] = []
        size = 0
        for record in self.spool.open(mark):
            entry = Pending(record.lsn, record.data, _size(record.data))
            batch.append(entry)
            size += entry.size
            if size >= self.max_events:
                self._load(batch)
                replayed += size
                batch, size = [], 0
        if batch:
            self._load(batch)
            replayed += size
        self.spool.release(self.drained_lsn)
        if replayed:
            logger.info("spool replayed", extra={"messages": replayed, "lsn": self.drained_lsn})
        return replayed

    def _load(self, batch: list[Pending]) -> None:
        lsn = batch[-1].lsn
        self.loader.load(concat_loads([entry.data for entry in batch], spool_lsn=lsn))
        self.drained_lsn = lsn
        self.loads += 1

    def add(self, lsn: int, data: LoadInput, size: int) -> None:
        """A record the writer made durable."""
        with self._cond:
            self._pending.append(Pending(lsn, data, size))
            self.backlog += size
            self._cond.notify_all()

    def start(self) -> None:
        """Start the drainer thread."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cdp-ingest-drainer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Load everything pending (once; what fails stays in the spool) and stop."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_drained(self, lsn: int | None = None, *, timeout: float = 60.0) -> bool:
        """Wait until every record up to `lsn` (default: the latest spooled) is loaded."""
        target = self.spool.last_lsn if lsn is None else lsn
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self.drained_lsn < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
            finally:
                self._waiters -= 1
        return True

    def _take(self, last_start: float) -> list[Pending] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            # Let records gather into one large load, unless someone waits or we stop.
            deadline = last_start + self.interval_s
            while not self._stopping and not self._waiters:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Pending] = []
            size = 0
            for entry in self._pending:
                batch.append(entry)
                size += entry.size
                if size >= self.max_events:
                    break
            return batch

    def _run(self) -> None:
        last_start = 0.0
        while True:
            batch = self._take(last_start)
            if batch is None:
                return
            last_start = time.monotonic()
            try:
                self._load(batch)
            except Exception:  # the records stay pending and in the spool: retried
                self.failures += 1
                logger.exception(
                    "loading spooled events failed; retrying",
                    extra={"records": len(batch), "lsn": batch[-1].lsn},
                )
                with self._cond:
                    if self._stopping:
                        return  # left in the spool, loaded on the next start
                    self._cond.wait(RETRY_SECONDS)
                continue
            self.spool.release(self.drained_lsn)
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self.backlog -= sum(entry.size for entry in batch)
                self._cond.notify_all()
