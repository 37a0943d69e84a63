"""The warehouse: the one owner of the DuckDB file, its schema and its connection.

One process opens the file for writing (DuckDB's rule); inside it every request or job
takes its own cursor. User values reach SQL only as `$name` parameters; identifiers only
through `quote_ident` from code-defined catalogues.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from cdp.errors import WarehouseLocked
from cdp.warehouse_schema import MIGRATIONS, WarehouseMigration

logger = logging.getLogger(__name__)

Cursor = duckdb.DuckDBPyConnection

# Rows of one DuckDB row group (its default, which the warehouse keeps). An append of more
# rows than this is written to the database file in whole row groups as it runs, and its
# last, partial row group stays a row group of its own: appends of a multiple of this many
# rows leave none behind for the next checkpoint to merge (see docs/ingestion.md).
ROW_GROUP_ROWS = 122_880

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A statement that only reads: one SELECT (or WITH ... SELECT) naming no writing keyword.
# Anything else counts as a possible write (see `Warehouse.writes`); erring that way is safe.
_READ = re.compile(r"\s*(SELECT|WITH)\b", re.IGNORECASE)
_WRITE_WORD = re.compile(
    r";|\b(INSERT|UPDATE|DELETE|MERGE|CREATE|DROP|ALTER|COPY|ATTACH|DETACH|CHECKPOINT"
    r"|VACUUM|IMPORT|EXPORT|LOAD|INSTALL|SET|RESET|PRAGMA|CALL|TRUNCATE|nextval|setval)\b",
    re.IGNORECASE,
)


def _may_write(sql: str) -> bool:
    return _READ.match(sql) is None or _WRITE_WORD.search(sql) is not None


@dataclass(frozen=True, slots=True)
class Query:
    """A SQL statement with its bound `$name` parameters."""

    sql: str
    params: dict[str, object] = field(default_factory=dict)


def quote_ident(name: str) -> str:
    """Quote a table or column name taken from a code-defined catalogue."""
    if not _IDENT.match(name):
        raise ValueError(f"not a valid SQL identifier: {name!r}")
    return '"' + name + '"'


def with_ctes(steps: Sequence[tuple[str, str]], final: str) -> str:
    """Join named CTE steps `(name, sql)` and a final SELECT into one statement."""
    if not steps:
        return final
    parts = [f"{quote_ident(name)} AS (\n{sql}\n)" for name, sql in steps]
    return "WITH " + ",\n".join(parts) + "\n" + final


def holder_file(path: Path) -> Path:
    """The file that names the process holding the warehouse open for writing."""
    return path.with_name(path.name + ".holder.json")


class Warehouse:
    """The DuckDB warehouse of this process."""

    def __init__(
        self,
        path: Path | str,
        *,
        memory_limit: str = "4GB",
        threads: int | None = None,
        holder: str = "cdp",
    ) -> None:
        self.path = str(path)
        self.memory_limit = memory_limit
        self.threads = threads
        self.holder = holder
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._writes = 0

    @property
    def in_memory(self) -> bool:
        """Whether this warehouse lives in memory only (tests)."""
        return self.path == ":memory:"

    def open(self) -> Warehouse:
        """Open the file, take the write lock, and bring the schema to the latest version."""
        if self._con is not None:
            return self
        config: dict[str, str | bool | int | float | list[str]] = {
            "memory_limit": self.memory_limit
        }
        if self.threads:
            config["threads"] = self.threads
        if not self.in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(self.path, config=config)
        except duckdb.IOException as exc:
            raise WarehouseLocked(self._locked_message(exc)) from exc
        if not self.in_memory:
            holder_file(Path(self.path)).write_text(
                json.dumps({"pid": os.getpid(), "holder": self.holder, "since": _now().isoformat()})
            )
        self.migrate()
        return self

    def _locked_message(self, exc: Exception) -> str:
        who = "another process"
        info_path = holder_file(Path(self.path))
        if info_path.exists():
            try:
                info = json.loads(info_path.read_text())
                who = f"{info.get('holder', 'a process')} (PID {info.get('pid')})"
            except (OSError, ValueError):
                pass
        return (
            f"The warehouse {self.path} is in use by {who}. DuckDB allows one writing process: "
            f"stop that process, or use the running server's API instead. ({exc})"
        )

    def close(self) -> None:
        """Release the file."""
        with self._lock:
            if self._con is None:
                return
            self._con.close()
            self._con = None
        if not self.in_memory:
            info_path = holder_file(Path(self.path))
            try:
                info = json.loads(info_path.read_text())
                if info.get("pid") == os.getpid():
                    info_path.unlink()
            except (OSError, ValueError):
                pass

    def __enter__(self) -> Warehouse:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def writes(self) -> int:
        """A counter that moves each time something that may have written through this object
        has finished: a cursor or transaction handed out, or a statement that is not a plain
        SELECT. It moves after the commit, so a caller that reads it, then reads some state,
        may reuse that state while the counter has not moved: no write committed since (one
        process owns the file, and every write of that process goes through here)."""
        return self._writes

    @contextmanager
    def cursor(self) -> Iterator[Cursor]:
        """A cursor of its own for the calling thread; closed on exit. Anything done through
        it counts as a possible write (`writes` moves when it is closed)."""
        try:
            with self._read_cursor() as cur:
                yield cur
        finally:
            with self._lock:
                self._writes += 1

    @contextmanager
    def _read_cursor(self) -> Iterator[Cursor]:
        with self._lock:
            if self._con is None:
                raise RuntimeError("warehouse is not open")
            cur = self._con.cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _cursor_for(self, sql: str) -> AbstractContextManager[Cursor]:
        return self.cursor() if _may_write(sql) else self._read_cursor()

    @contextmanager
    def transaction(self) -> Iterator[Cursor]:
        """A cursor inside one transaction: committed on success, rolled back on error."""
        with self.cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def run(self, query: Query) -> pl.DataFrame:
        """Run a query and return its result as a Polars frame."""
        with self._cursor_for(query.sql) as cur:
            relation = cur.sql(query.sql, params=query.params or None)
            if relation is None:
                return pl.DataFrame()
            frame: pl.DataFrame = relation.pl()
            return frame

    def arrow(self, query: Query) -> pa.Table:
        """Run a query and return its result as an Arrow table."""
        with self._cursor_for(query.sql) as cur:
            relation = cur.sql(query.sql, params=query.params or None)
            if relation is None:
                return pa.table({})
            table: pa.Table = relation.to_arrow_table()
            return table

    def rows(self, query: Query) -> list[tuple[Any, ...]]:  # Any: SQL values
        """Run a query and return its rows as tuples (small results only)."""
        with self._cursor_for(query.sql) as cur:
            return cur.execute(query.sql, query.params or None).fetchall()

    def scalar(self, query: Query) -> Any:  # Any: SQL value
        """Run a query and return the first column of its first row, or None."""
        with self._cursor_for(query.sql) as cur:
            row = cur.execute(query.sql, query.params or None).fetchone()
        return None if row is None else row[0]

    def execute(self, query: Query) -> None:
        """Run a statement that returns nothing of interest."""
        with self.cursor() as cur:
            cur.execute(query.sql, query.params or None)

    def ping(self) -> None:
        """Raise if the warehouse cannot answer a trivial query."""
        self.scalar(Query("SELECT 1"))

    def migrate(self) -> int:
        """Apply the versioned DDL not yet applied; returns the schema version."""
        with self.cursor() as cur:
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
                " applied_at TIMESTAMP NOT NULL)"
            )
            applied = {
                int(r[0]) for r in cur.execute("SELECT version FROM schema_version").fetchall()
            }
        # Applied by set difference, not "above the max": packages own separate version
        # ranges, and a range may gain a step after a higher one was applied.
        for migration in _ordered(MIGRATIONS):
            if migration.version in applied:
                continue
            logger.info(
                "applying warehouse migration",
                extra={"version": migration.version, "migration": migration.name},
            )
            with self.transaction() as cur:
                for statement in migration.statements:
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO schema_version VALUES ($v, $n, $at)",
                    {"v": migration.version, "n": migration.name, "at": _now_naive()},
                )
            applied.add(migration.version)
        return max(applied, default=0)

    def schema_version(self) -> int:
        """The version of the applied warehouse schema."""
        return int(self.scalar(Query("SELECT coalesce(max(version), 0) FROM schema_version")))


def _ordered(migrations: Sequence[WarehouseMigration]) -> list[WarehouseMigration]:
    ordered = sorted(migrations, key=lambda m: m.version)
    versions = [m.version for m in ordered]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate warehouse migration versions: {versions}")
    return ordered


def _now() -> datetime:
    return datetime.now(UTC)


def _now_naive() -> datetime:
    """UTC now without a zone: warehouse TIMESTAMP columns hold UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)
