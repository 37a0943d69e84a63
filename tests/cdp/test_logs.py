"""Logging set-up: JSON lines, and the scheduler's per-run chatter kept out at INFO."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from cdp.logs import CHATTY_LOGGERS, configure_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def test_job_run_lines_are_left_out_at_info_and_shown_at_debug(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO")
    logging.getLogger("apscheduler.executors.default").info('Running job "x" (scheduled)')
    logging.getLogger("apscheduler.executors.default").warning("Run time of job was missed")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "POST /v1/batch HTTP/1.1" 200')
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1:8000/v1/batch")
    logging.getLogger("cdp.app").info("request")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["Run time of job was missed", "request"]

    configure_logging("DEBUG")
    logging.getLogger("apscheduler.executors.default").info('Running job "x" (scheduled)')
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ['Running job "x" (scheduled)']


def test_a_tick_skipped_while_its_job_runs_is_logged_at_debug_only(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    skipped = 'Execution of job "%s" skipped: maximum number of running instances reached (%d)'
    scheduler = logging.getLogger("apscheduler.scheduler")
    configure_logging("INFO")
    scheduler.warning(skipped, "real time", 1)
    scheduler.warning("Run time of job %s was missed by %s", "x", "0:00:02")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["Run time of job x was missed by 0:00:02"]

    configure_logging("DEBUG")
    scheduler.warning(skipped, "real time", 1)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == [
        'Execution of job "real time" skipped: maximum number of running instances reached (1)'
    ]
