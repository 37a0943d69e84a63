"""The tracking API's spool: an append-only, fsynced log of acknowledged loads.

The group-commit writer appends one record per group of requests (one `write` and one
`fdatasync`), then answers the requests; the drainer loads records into DuckDB later, in
large batches. Every record has a log sequence number (lsn), increasing across segments;
the warehouse stores the highest lsn whose load committed (`ingest_spool_mark`, written in
the load's own transaction), so a record is in DuckDB exactly when its lsn is at or below
the mark. On start, records above the mark are loaded again before the server answers.

Layout: a directory of segment files `seg-<first lsn>.spool`, written in order. A record is

    header  magic "CDPS", lsn (u64), body length (u32), crc32 of the body (u32)
    body    lengths of its four parts (4 x u32), then: JSON of the load's scalars,
            and the events, identifiers and rejections frames as Arrow IPC streams

A record whose header or checksum does not match (a crash while it was written, before
its fsync, hence never acknowledged) ends its segment's readable part and is cut off.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import polars as pl

from ingestion.loader import LoadInput

logger = logging.getLogger(__name__)

MAGIC = b"CDPS"
HEADER = struct.Struct("<4sQII")
PARTS = struct.Struct("<IIII")
PREFIX = "seg-"
SUFFIX = ".spool"


@dataclass(frozen=True, slots=True)
class SpoolRecord:
    """One spooled load and its sequence number."""

    lsn: int
    data: LoadInput


def encode(data: LoadInput) -> bytes:
    """The body of a record: a load's scalars and frames."""
    meta = orjson.dumps(
        {"channel": data.channel, "dropped": data.dropped, "import_id": data.import_id}
    )
    blobs = [meta]
    for frame in (data.events, data.identifiers, data.rejections):
        buffer = io.BytesIO()
        frame.write_ipc_stream(buffer, compression="uncompressed")
        blobs.append(buffer.getvalue())
    return PARTS.pack(*(len(b) for b in blobs)) + b"".join(blobs)


def decode(body: bytes) -> LoadInput:
    """The load of a record body (the inverse of `encode`)."""
    sizes = PARTS.unpack_from(body)
    offset = PARTS.size
    parts: list[bytes] = []
    for size in sizes:
        parts.append(body[offset : offset + size])
        offset += size
    meta = orjson.loads(parts[0])
    events, identifiers, rejections = (pl.read_ipc_stream(io.BytesIO(p)) for p in parts[1:])
    return LoadInput(
        channel=str(meta["channel"]),
        events=events,
        identifiers=identifiers,
        rejections=rejections,
        dropped={str(k): int(v) for k, v in meta["dropped"].items()},
        import_id=meta["import_id"],
    )


def _segment_name(first_lsn: int) -> str:
    return f"{PREFIX}{first_lsn:020d}{SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(slots=True)
class _Segment:
    path: Path
    last_lsn: int


class Spool:
    """Segment files of spooled loads: appended by one writer, released after loading."""

    def __init__(self, directory: Path, *, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        # Segments no longer written to, oldest first, with their last lsn.
        self._sealed: list[_Segment] = []
        self._current: _Segment | None = None
        self._fd: int | None = None
        self._size = 0
        self._next_lsn = 1
        self._last_lsn = 0
        self.opened = False
        self._replaying = False

    @property
    def last_lsn(self) -> int:
        """The lsn of the latest record appended and fsynced (0 before any)."""
        return self._last_lsn

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"{PREFIX}*{SUFFIX}"))

    def open(self, drained_lsn: int) -> Iterator[SpoolRecord]:
        """Open the spool; returns, in order, the records not yet loaded (lsn > drained_lsn).

        Consume the whole iterator before appending. Segments entirely at or below the mark
        are deleted on the way. Appends go to a new segment, so existing ones are never
        written again; their unreadable tails are cut off.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.opened = True
        self._replaying = True
        self._next_lsn = drained_lsn + 1
        self._last_lsn = drained_lsn
        return self._replay(self._segments(), drained_lsn)

    def _replay(self, paths: list[Path], drained_lsn: int) -> Iterator[SpoolRecord]:
        for path in paths:
            last = 0
            for record in self._read(path):
                last = record.lsn
                self._next_lsn = max(self._next_lsn, record.lsn + 1)
                self._last_lsn = max(self._last_lsn, record.lsn)
                if record.lsn > drained_lsn:
                    yield record
            if last <= drained_lsn:
                path.unlink()
            else:
                with self._lock:
                    self._sealed.append(_Segment(path, last))
        self._replaying = False

    def _read(self, path: Path) -> Iterator[SpoolRecord]:
        with path.open("r+b") as handle:
            good = 0
            while True:
                header = handle.read(HEADER.size)
                if not header:
                    break
                if len(header) < HEADER.size:
                    break
                magic, lsn, length, crc = HEADER.unpack(header)
                if magic != MAGIC:
                    break
                body = handle.read(length)
                if len(body) < length or zlib.crc32(body) != crc:
                    break
                good = handle.tell()
                yield SpoolRecord(lsn, decode(body))
            size = handle.seek(0, io.SEEK_END)
            if good < size:
                # Written by a process that died before its fsync: never acknowledged.
                logger.warning(
                    "spool segment has an incomplete tail, cut off",
                    extra={"segment": path.name, "bytes": size - good},
                )
                handle.truncate(good)
                handle.flush()
                os.fsync(handle.fileno())

    def append(self, data: LoadInput) -> int:
        """Write one record and fsync it; returns its lsn. Called by one thread only."""
        if not self.opened or self._replaying:
            raise RuntimeError("the spool is not open, or its replay is not finished")
        lsn = self._next_lsn
        body = encode(data)
        record = HEADER.pack(MAGIC, lsn, len(body), zlib.crc32(body)) + body
        if self._fd is None:
            path = self.directory / _segment_name(lsn)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            self._current = _Segment(path, lsn - 1)
            self._size = 0
            _fsync_dir(self.directory)  # the new file's name is durable too
        try:
            _write_all(self._fd, record)
            os.fdatasync(self._fd)
        except OSError:
            # Not acknowledged. The segment may end with a partial record (cut off on
            # replay) or a whole one (loaded on replay; its messages dedupe if resent):
            # seal it, and give the next record a new number in a new segment.
            self._next_lsn = lsn + 1
            self._seal()
            raise
        assert self._current is not None
        self._next_lsn = lsn + 1
        self._last_lsn = lsn
        self._current.last_lsn = lsn
        self._size += len(record)
        if self._size >= self.segment_bytes:
            self._seal()
        return lsn

    def _seal(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        assert self._current is not None
        with self._lock:
            self._sealed.append(self._current)
        self._current = None

    def release(self, drained_lsn: int) -> None:
        """Delete the sealed segments whose records are all loaded (lsn <= drained_lsn)."""
        with self._lock:
            done = [s for s in self._sealed if s.last_lsn <= drained_lsn]
            self._sealed = [s for s in self._sealed if s.last_lsn > drained_lsn]
        for segment in done:
            segment.path.unlink(missing_ok=True)

    def close(self, drained_lsn: int) -> None:
        """Close the current segment; delete every segment whose records are all loaded."""
        if self._fd is not None and self._current is not None:
            self._seal()
        self.release(drained_lsn)
        self.opened = False

    def files(self) -> list[Path]:
        """The segment files on disk, oldest first."""
        return self._segments()
