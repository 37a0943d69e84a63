"""Scheduled jobs of the ingestion package."""

from cdp.scheduler import JobSpec

JOBS: tuple[JobSpec, ...] = ()
