"""Connectors: each reads one kind of source and yields chunks of records as Polars frames."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import polars as pl

# Every chunk carries this column: the 1-based number of the record in the source
# (the row of a file, the position of a pulled row), used to report rejected rows.
ROW = "_row"
# Set on a record the connector could not parse (a malformed NDJSON line): its reason. Such a
# row carries nothing else and is rejected with that reason under its number.
MALFORMED = "_malformed"


class Connector(Protocol):
    """A source of records, read in chunks."""

    name: str

    def chunks(self) -> Iterator[pl.DataFrame]:
        """The records, chunk by chunk, each with a `_row` column."""
        ...


class FrameConnector:
    """Records already in memory (tests, small programmatic loads)."""

    def __init__(self, frame: pl.DataFrame, *, name: str = "frame", chunk_size: int = 100_000):
        self.name = name
        self.frame = frame.with_row_index(ROW, offset=1).with_columns(pl.col(ROW).cast(pl.Int64))
        self.chunk_size = chunk_size

    def chunks(self) -> Iterator[pl.DataFrame]:
        """The frame in slices of `chunk_size` rows."""
        yield from self.frame.iter_slices(self.chunk_size)
