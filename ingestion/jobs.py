"""Scheduled jobs of the ingestion package."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from apscheduler.triggers.cron import CronTrigger

from cdp.db import utcnow
from cdp.scheduler import JobContext, JobSpec
from ingestion import service
from ingestion.schemas import DatabaseConfig

logger = logging.getLogger(__name__)


def is_due(config: DatabaseConfig, last_pull_at: datetime | None, now: datetime) -> bool:
    """Whether a database source's schedule calls for a pull now."""
    if config.schedule is None:
        return False
    if last_pull_at is None:
        return True
    if config.schedule.interval_seconds is not None:
        return now - last_pull_at >= timedelta(seconds=config.schedule.interval_seconds)
    assert config.schedule.cron is not None
    trigger = CronTrigger.from_crontab(config.schedule.cron, timezone="UTC")
    next_time: datetime | None = trigger.get_next_fire_time(None, last_pull_at)
    return next_time is not None and next_time <= now


def pull_due_databases(context: JobContext) -> int:
    """Pull every enabled database source whose schedule is due; returns rows stored."""
    now = utcnow()
    with context.db.begin() as session:
        due = [
            source.id
            for source in service.list_sources(session, limit=10_000, offset=0)[0]
            if source.kind == "database"
            and source.enabled
            and is_due(DatabaseConfig.model_validate(source.config), source.last_pull_at, now)
        ]
    stored = 0
    for source_id in due:
        run = service.pull_database(
            context.db,
            context.warehouse,
            source_id=source_id,
            region=context.settings.default_phone_region,
        )
        stored += run.accepted
    context.message = f"pulled {len(due)} database sources"
    return stored


JOBS: tuple[JobSpec, ...] = (
    JobSpec(
        name="ingestion.pull_databases",
        func=pull_due_databases,
        description="Pull the database sources whose schedule is due",
        trigger="interval",
        trigger_args={"minutes": 1},
    ),
)
