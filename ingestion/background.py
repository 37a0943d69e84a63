"""Background file imports: an upload is answered at once, and imported by this worker.

One thread imports queued uploads one after another (imports share the loader, so running
two at once would not be faster). Each import's record (`ingestion_import`) is the job's
record: status `queued`, `running`, then `succeeded`, `skipped` or `failed`, with rows
read, rows total, accepted, rejected, duplicates and duration, updated after every chunk.

On start, uploads still `queued` from before a stop are queued again, and imports left
`running` by a crash are marked failed. On stop, the running import ends after its
current chunk (recorded as failed, what it loaded stays); the queued ones wait for the
next start, their files kept on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from sqlalchemy import select

from cdp.db import Database, utcnow
from cdp.warehouse import Warehouse
from ingestion.connectors.files import run_queued_import
from ingestion.models import ImportRun

logger = logging.getLogger(__name__)


class ImportWorker:
    """One thread running queued file imports in order."""

    def __init__(self, db: Database, warehouse: Warehouse, *, region: str) -> None:
        self.db = db
        self.warehouse = warehouse
        self.region = region
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Recover the records of a previous run, then start the thread."""
        if self._thread is not None:
            return
        self._stopping.clear()
        for import_id in self._recover():
            self._queue.put(import_id)
        self._thread = threading.Thread(target=self._run, name="cdp-ingest-imports", daemon=True)
        self._thread.start()

    def _recover(self) -> list[str]:
        with self.db.begin() as session:
            for run in session.scalars(select(ImportRun).where(ImportRun.status == "running")):
                if run.file_path is None:
                    continue  # a CLI import or a pull: not ours
                run.status = "failed"
                run.finished_at = utcnow()
                run.error = "interrupted: the server stopped during the import"
                Path(run.file_path).unlink(missing_ok=True)
                run.file_path = None
            queued = session.scalars(
                select(ImportRun)
                .where(ImportRun.status == "queued", ImportRun.file_path.is_not(None))
                .order_by(ImportRun.started_at)
            ).all()
            return [run.id for run in queued]

    def submit(self, import_id: str) -> None:
        """Import a queued upload in the background."""
        self._queue.put(import_id)

    def stop(self) -> None:
        """Stop after the current chunk of the running import; queued ones stay queued."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            import_id = self._queue.get()
            if import_id is None or self._stopping.is_set():
                return  # what is still queued is queued again on the next start
            self._import(import_id)

    def _import(self, import_id: str) -> None:
        with self.db.begin() as session:
            run = session.get(ImportRun, import_id)
            if run is None or run.status != "queued" or run.file_path is None:
                return
            path = Path(run.file_path)
        try:
            run_queued_import(
                self.db,
                self.warehouse,
                import_id=import_id,
                path=path,
                region=self.region,
                should_stop=self._stopping.is_set,
            )
        except Exception:  # recorded on the import record; the worker goes on
            logger.exception("background import failed", extra={"import_id": import_id})
        finally:
            path.unlink(missing_ok=True)
            with self.db.begin() as session:
                run = session.get(ImportRun, import_id)
                if run is not None:
                    run.file_path = None
