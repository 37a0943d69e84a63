"""Structured logging: one JSON object per line, carrying the request id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)

# Attributes every LogRecord has; anything else was passed through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with its extra fields and the request id."""

    def format(self, record: logging.LogRecord) -> str:
        """Render the record."""
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            payload["request_id"] = request_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


CHATTY_LOGGERS = ("apscheduler.executors", "uvicorn.access", "httpx")


class _SkippedTicks(logging.Filter):
    """Drops APScheduler's warning for a tick that finds its job still running, below DEBUG.

    One run at a time per job is by design, and the real-time loyalty job keeps a run going
    while events arrive: its one-second ticks would log this warning every second under load.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            "maximum number of running instances reached" in str(record.msg)
            and logging.getLogger().getEffectiveLevel() > logging.DEBUG
        )


_SKIPPED_TICKS = _SkippedTicks()


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send the platform's logs to stderr, as JSON lines or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_cdp", False):
            root.removeHandler(existing)
    handler._cdp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Chatter that buried everything else at INFO, shown again at DEBUG: APScheduler's two
    # lines per job run ("Running job", "executed successfully"; with jobs every second), each
    # run being recorded in `cdp_job_run` and failures logged by the job runner; uvicorn's
    # access line, which repeats the app's own `request` line (that one has the request id and
    # the duration); and httpx's line per request of the demo's replay client.
    quiet = logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    scheduler_logger = logging.getLogger("apscheduler.scheduler")
    if _SKIPPED_TICKS not in scheduler_logger.filters:
        scheduler_logger.addFilter(_SKIPPED_TICKS)
