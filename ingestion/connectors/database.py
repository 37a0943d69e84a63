"""The database connector: incremental pulls of a table or query through SQLAlchemy.

Each pull reads the rows whose cursor column is past the saved cursor, in chunks ordered
by the cursor (keyset pagination), loads each chunk, and saves the chunk's highest cursor
only after the chunk is committed. A chunk never splits rows sharing one cursor value,
so `>` on the next chunk loses nothing; a crash between load and save re-reads rows that
then dedupe (their message id is a hash of their content).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy import Engine

from cdp.db import Database, make_engine, new_id, utcnow
from cdp.warehouse import Warehouse
from ingestion import transform
from ingestion.connectors import ROW
from ingestion.errors import PullFailed, SourceDisabled, SourceNotFound, WrongSourceKind
from ingestion.imports import now_naive, run_import
from ingestion.loader import md5_hex
from ingestion.models import ImportRun, Source
from ingestion.schemas import DatabaseConfig, Mapping

logger = logging.getLogger(__name__)

CursorValue = datetime | date | int | float | Decimal | str


def encode_cursor(value: CursorValue) -> tuple[str, str]:
    """A cursor value as (text, type) for the operational store."""
    if isinstance(value, datetime):
        return value.isoformat(), "datetime"
    if isinstance(value, date):
        return value.isoformat(), "date"
    if isinstance(value, bool | int):
        return str(int(value)), "int"
    if isinstance(value, Decimal):
        return str(value), "decimal"
    if isinstance(value, float):
        return repr(value), "float"
    return str(value), "str"


def decode_cursor(text: str | None, kind: str | None) -> CursorValue | None:
    """The cursor value saved by `encode_cursor`."""
    if text is None:
        return None
    match kind:
        case "datetime":
            return datetime.fromisoformat(text)
        case "date":
            return date.fromisoformat(text)
        case "int":
            return int(text)
        case "decimal":
            return Decimal(text)
        case "float":
            return float(text)
    return text


class DatabaseConnector:
    """Rows of a table or query past a cursor, in chunks that never split a cursor value."""

    def __init__(self, engine: Engine, config: DatabaseConfig, cursor: CursorValue | None):
        self.engine = engine
        self.config = config
        self.cursor = cursor
        self.name = config.table or "query"
        self.last_cursor: CursorValue | None = cursor
        self._rows = 0

    def _relation(self, connection: sa.Connection) -> sa.FromClause:
        if self.config.table:
            return sa.Table(
                self.config.table,
                sa.MetaData(),
                schema=self.config.db_schema,
                autoload_with=connection,
            )
        assert self.config.query is not None
        # The query is the source's own configuration, written by a `data` user for their
        # own database; it is wrapped, never combined with request values.
        return sa.text(self.config.query).columns().subquery("src")

    def _select(self, relation: sa.FromClause, cursor_col: sa.ColumnElement[Any]) -> sa.Select[Any]:
        if isinstance(relation, sa.Table):
            return sa.select(relation)
        return sa.select(sa.text("*")).select_from(relation)

    def chunks(self) -> Iterator[pl.DataFrame]:
        """New rows in cursor order, `chunk_size` at a time."""
        size = self.config.chunk_size
        with self.engine.connect() as connection:
            relation = self._relation(connection)
            cursor_col: sa.ColumnElement[Any]
            if isinstance(relation, sa.Table):
                if self.config.cursor_column not in relation.c:
                    raise PullFailed(f"table has no column {self.config.cursor_column!r}")
                cursor_col = relation.c[self.config.cursor_column]
            else:
                cursor_col = sa.literal_column(
                    f"src.{_quoted(connection, self.config.cursor_column)}"
                )
            base = self._select(relation, cursor_col)
            last = self.cursor
            while True:
                query = base.where(cursor_col.is_not(None))
                if last is not None:
                    query = query.where(cursor_col > last)
                frame = self._read(connection, query.order_by(cursor_col).limit(size))
                if frame.is_empty():
                    return
                top = frame[self.config.cursor_column].max()
                if frame.height == size:
                    # Rows sharing the top cursor value may continue past the limit:
                    # take all of them in this chunk so the next `>` skips none.
                    ties = self._read(connection, base.where(cursor_col == top))
                    frame = pl.concat(
                        [frame.filter(pl.col(self.config.cursor_column) != top), ties],
                        how="vertical_relaxed",
                    )
                chunk = frame.with_columns(
                    pl.int_range(
                        self._rows + 1, self._rows + 1 + frame.height, dtype=pl.Int64
                    ).alias(ROW)
                )
                self._rows += frame.height
                yield chunk
                last = top  # type: ignore[assignment]
                self.last_cursor = last

    def _read(self, connection: sa.Connection, query: sa.Select[Any]) -> pl.DataFrame:
        try:
            result = connection.execute(query)
            keys = list(result.keys())
            rows = result.fetchall()
        except sa.exc.SQLAlchemyError as exc:
            raise PullFailed(
                f"reading the source database failed: {exc.__class__.__name__}"
            ) from exc
        if self.config.cursor_column not in keys:
            raise PullFailed(f"the query returns no column {self.config.cursor_column!r}")
        return pl.DataFrame(
            [list(r) for r in rows], schema=keys, orient="row", infer_schema_length=None
        )


def _quoted(connection: sa.Connection, name: str) -> str:
    quoted: str = connection.dialect.identifier_preparer.quote(name)
    return quoted


def pull(db: Database, warehouse: Warehouse, *, source_id: str, region: str) -> ImportRun:
    """Pull a `database` source's new rows now; returns the import record of the pull."""
    with db.begin() as session:
        source = session.get(Source, source_id)
        if source is None:
            raise SourceNotFound(f"source {source_id} does not exist")
        if source.kind != "database":
            raise WrongSourceKind(f"source {source.name} is a {source.kind} source, not database")
        if not source.enabled:
            raise SourceDisabled(f"source {source.name} is disabled")
        config = DatabaseConfig.model_validate(source.config)
        mapping = Mapping.model_validate(source.mapping)
        cursor = decode_cursor(source.cursor_value, source.cursor_type)
        run = ImportRun(
            id=new_id(),
            source_id=source_id,
            channel="database",
            name=config.table or "query",
            status="running",
            started_at=utcnow(),
        )
        session.add(run)
        import_id = run.id
    engine = make_engine(config.url)
    ctx = transform.Context(
        source_id=source_id,
        channel="database",
        region=region,
        received_at=now_naive(),
        import_id=import_id,
        hasher=lambda values: md5_hex(warehouse, values),
    )
    connector = DatabaseConnector(engine, config, cursor)

    def save_cursor(chunk: pl.DataFrame) -> None:
        top = chunk[config.cursor_column].max()
        text, kind = encode_cursor(top)  # type: ignore[arg-type]
        with db.begin() as session:
            row = session.get(Source, source_id)
            if row is not None:
                row.cursor_value, row.cursor_type = text, kind

    try:
        result = run_import(
            db,
            warehouse,
            import_id=import_id,
            connector=connector,
            transform=lambda chunk: transform.mapped(chunk, mapping, ctx),
            after_chunk=save_cursor,
        )
    finally:
        engine.dispose()
        with db.begin() as session:
            row = session.get(Source, source_id)
            if row is not None:
                row.last_pull_at = utcnow()
    return result
